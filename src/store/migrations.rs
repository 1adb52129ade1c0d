//! Migrations compiled into the binary, as `sqlx::migrate!` would embed them, without its proc
//! macro: that macro needs sqlx's `macros` feature, which builds sqlx a second time for the compiler
//! (its drivers and the whole SQLite C library included) and was the longest pole of a cold build.
//!
//! The files are listed by [`embed!`]; a test (`every_migration_file_is_embedded`) fails when a
//! file in `migrations/` is missing from its list. Versions, descriptions, types and checksums are
//! derived from file names and contents exactly as sqlx derives them, so databases migrated by
//! earlier builds see the same migrations, already applied.

use std::borrow::Cow;
use std::sync::LazyLock;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

/// Migration files: (file name, contents).
#[derive(Debug, Clone, Copy)]
pub struct Embedded(pub &'static [(&'static str, &'static str)]);

/// `(file name, contents)` of each named file of a directory under `migrations/`.
macro_rules! embed {
    ($dir:literal: $($file:literal),+ $(,)?) => {
        $crate::store::migrations::Embedded(&[$((
            $file,
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/", $dir, "/", $file)),
        )),+])
    };
}
pub(crate) use embed;

impl Embedded {
    /// The migrations, parsed as sqlx parses a directory of them.
    pub fn migrations(self) -> Result<Vec<Migration>, BoxDynError> {
        let mut migrations = Vec::with_capacity(self.0.len());
        for (name, sql) in self.0 {
            // `<version>_<description>.sql`, or `.up.sql` / `.down.sql` for reversible ones.
            let (version, rest) = name
                .split_once('_')
                .ok_or_else(|| format!("migration file {name}: no `<version>_` prefix"))?;
            let version: i64 = version
                .parse()
                .map_err(|_| format!("migration file {name}: version {version} is not a number"))?;
            let migration_type = MigrationType::from_filename(rest);
            let description = rest
                .trim_end_matches(migration_type.suffix())
                .replace('_', " ");
            let no_tx = sql.starts_with("-- no-transaction");
            migrations.push(Migration::new(
                version,
                Cow::Owned(description),
                migration_type,
                Cow::Borrowed(sql),
                no_tx,
            ));
        }
        // In version order, as sqlx sorts a directory's files.
        migrations.sort_by_key(|m| m.version);
        Ok(migrations)
    }

    /// A migrator over these migrations (what `sqlx::migrate!` returns).
    pub fn migrator(self) -> Migrator {
        futures::executor::block_on(Migrator::new(self)).expect("embedded migrations are valid")
    }
}

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { self.migrations() })
    }
}

/// A migrator built on first use.
pub type Lazy = LazyLock<Migrator>;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn files(dir: &str) -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dir);
        let mut names: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    }

    /// (version, down?) -> (description, checksum, no_tx) of every migration.
    fn described(migrator: &Migrator) -> BTreeMap<(i64, bool), (String, Vec<u8>, bool)> {
        migrator
            .iter()
            .map(|m| {
                (
                    (m.version, m.migration_type.is_down_migration()),
                    (m.description.to_string(), m.checksum.to_vec(), m.no_tx),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn every_migration_file_is_embedded() {
        for (dir, migrator) in [
            ("sqlite", &*crate::store::sqlite::MIGRATOR),
            ("postgres", &*crate::store::postgres::MIGRATOR),
        ] {
            let on_disk = files(dir);
            assert_eq!(migrator.iter().count(), on_disk.len(), "{dir}: {on_disk:?}");
            // What `sqlx::migrate!` embedded (it reads the directory the same way), checksums
            // (recorded in `_sqlx_migrations`) included.
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(dir);
            let from_disk = Migrator::new(path).await.unwrap();
            assert_eq!(described(migrator), described(&from_disk), "{dir}");
            let versions: Vec<i64> = migrator.iter().map(|m| m.version).collect();
            assert!(versions.is_sorted(), "{dir}: {versions:?}");
        }
    }

    #[test]
    fn a_file_name_without_a_version_is_refused() {
        assert!(Embedded(&[("init.sql", "SELECT 1")]).migrations().is_err());
        assert!(
            Embedded(&[("x_init.sql", "SELECT 1")])
                .migrations()
                .is_err()
        );
    }
}
