//! Which browser origins may use the gateway (`server.allowed_origins`): one policy for both
//! doors. The WebSocket upgrade refuses a page from any other origin (HTTP 403, before it takes a
//! connection slot or shows a token); the REST routes browsers call answer CORS for allowed
//! origins only. A request without `Origin` does not come from a page (a backend, a load tool):
//! the policy does not concern it.
//!
//! An entry is an origin, `scheme://host[:port]` (http or https), or a pattern of one:
//! `https://*.example.com` (any subdomain of example.com, at any depth; not example.com itself),
//! `http://localhost:*` (any port). Left empty, the setting means the mode's default: in dev mode
//! any port of `http://localhost` and `http://127.0.0.1`, so the demo and an app under
//! development work; with a key configured, no other origin than the gateway's own.
//!
//! The gateway's own origin is always allowed: an `Origin` whose host and port are those of the
//! request's `Host` header (a port left out is the default of the `Origin`'s scheme). The scheme
//! is not compared: behind a balancer that terminates TLS the gateway is reached over http by
//! pages loaded over https, and only the `Host` the balancer passes on tells it where it was
//! reached.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{ConfigError, Settings};

/// The dev-mode default: a page served by the gateway itself (the demo) or by a development
/// server on the same machine.
const DEV_MODE_ORIGINS: &[&str] = &["http://localhost:*", "http://127.0.0.1:*"];

/// How long a browser may reuse a preflight's answer (per URL, so per room): one extra round trip
/// per room and method every ten minutes is cheap, and an origin taken off the list (and the
/// gateway restarted) is refused in every answer at once, but its browser may still send the
/// requests a cached preflight allowed until it expires.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// The origins allowed besides the gateway's own.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    allowed: Vec<OriginPattern>,
    /// The list is the dev-mode default, not `server.allowed_origins` (for the start-up log).
    dev_default: bool,
}

/// Where a request says it comes from, judged by the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOrigin {
    /// No `Origin` header: not a page's request.
    Absent,
    Allowed,
    /// Another origin, or an `Origin` that is not one (`null` from a sandboxed frame or a file).
    Refused,
}

impl OriginPolicy {
    /// `server.allowed_origins`, or the mode's default when it is empty. Empty entries are skipped
    /// (the environment variable's `a,,b` or trailing comma); an invalid one names the key.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let mut allowed = Vec::new();
        for entry in &settings.server.allowed_origins {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let pattern = entry.parse().map_err(|why| {
                ConfigError(format!(
                    "server.allowed_origins: `{entry}` is not an origin: {why}"
                ))
            })?;
            allowed.push(pattern);
        }
        let dev_default = allowed.is_empty() && settings.dev_mode();
        if dev_default {
            allowed = DEV_MODE_ORIGINS
                .iter()
                .map(|p| p.parse().expect("the dev-mode origins are valid"))
                .collect();
        }
        Ok(Self {
            allowed,
            dev_default,
        })
    }

    /// Judges a request by its `Origin` and `Host` headers.
    pub fn check(&self, headers: &HeaderMap) -> RequestOrigin {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return RequestOrigin::Absent;
        };
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if self.allows(origin, host) {
            RequestOrigin::Allowed
        } else {
            RequestOrigin::Refused
        }
    }

    /// Whether a page from `origin` may use the gateway reached as `host` (the `Host` header).
    pub fn allows(&self, origin: &HeaderValue, host: Option<&str>) -> bool {
        let Some(origin) = origin.to_str().ok().and_then(Origin::parse) else {
            return false;
        };
        host.is_some_and(|host| origin.is_served_as(host))
            || self.allowed.iter().any(|p| p.matches(&origin))
    }
}

impl fmt::Display for OriginPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
        let list = list.join(", ");
        match (list.is_empty(), self.dev_default) {
            (true, _) => write!(f, "the gateway's own origin only"),
            (false, true) => write!(
                f,
                "{list} (dev mode's default) and the gateway's own origin"
            ),
            (false, false) => write!(f, "{list} and the gateway's own origin"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// One entry of `server.allowed_origins`, in lower case, its port resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Scheme,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any host ending so, the domain itself not.
    SubdomainOf(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Exact(u16),
    Any,
}

/// A browser's `Origin` header, in lower case, its port resolved.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: Scheme,
    host: String,
    port: u16,
}

impl FromStr for OriginPattern {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or("write it scheme://host[:port]")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err("the scheme must be http or https"),
        };
        if rest.contains(['/', '?', '#', '@']) {
            return Err(
                "an origin has no path (not even `/`), query or user: scheme://host[:port]",
            );
        }
        let (host, port) = split_host_port(rest)?;
        let port = match port {
            None => PortPattern::Exact(scheme.default_port()),
            Some("*") => PortPattern::Any,
            Some(port) => PortPattern::Exact(parse_port(port)?),
        };
        let host = host.to_ascii_lowercase();
        let host = match host.strip_prefix("*.") {
            Some(domain) => {
                check_host(domain)?;
                if domain.starts_with('[') {
                    return Err("`*.` is for domain names, not addresses");
                }
                HostPattern::SubdomainOf(format!(".{domain}"))
            }
            None => {
                check_host(&host)?;
                HostPattern::Exact(host)
            }
        };
        Ok(Self { scheme, host, port })
    }
}

impl OriginPattern {
    fn matches(&self, origin: &Origin) -> bool {
        let port = match self.port {
            PortPattern::Exact(port) => port == origin.port,
            PortPattern::Any => true,
        };
        let host = match &self.host {
            HostPattern::Exact(host) => *host == origin.host,
            HostPattern::SubdomainOf(suffix) => {
                origin.host.len() > suffix.len() && origin.host.ends_with(suffix.as_str())
            }
        };
        self.scheme == origin.scheme && port && host
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        match &self.host {
            HostPattern::Exact(host) => write!(f, "{host}")?,
            HostPattern::SubdomainOf(suffix) => write!(f, "*{suffix}")?,
        }
        match self.port {
            PortPattern::Exact(port) if port == self.scheme.default_port() => Ok(()),
            PortPattern::Exact(port) => write!(f, ":{port}"),
            PortPattern::Any => write!(f, ":*"),
        }
    }
}

impl Origin {
    /// Parses an `Origin` header: one origin, no pattern. `None` for anything else (`null`).
    fn parse(s: &str) -> Option<Origin> {
        let pattern: OriginPattern = s.parse().ok()?;
        match pattern {
            OriginPattern {
                scheme,
                host: HostPattern::Exact(host),
                port: PortPattern::Exact(port),
            } => Some(Origin { scheme, host, port }),
            _ => None,
        }
    }

    /// Whether this is the origin of the gateway reached as `host` (a `Host` header): same host
    /// and port, the scheme not compared (see the module's documentation).
    fn is_served_as(&self, host: &str) -> bool {
        let Ok((name, port)) = split_host_port(host) else {
            return false;
        };
        let port = match port {
            None => self.scheme.default_port(),
            Some(port) => match parse_port(port) {
                Ok(port) => port,
                Err(_) => return false,
            },
        };
        name.eq_ignore_ascii_case(&self.host) && port == self.port
    }
}

/// `host[:port]`, the host possibly a bracketed IPv6 address.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), &'static str> {
    if s.starts_with('[') {
        let end = s.find(']').ok_or("an IPv6 address needs its closing `]`")?;
        let (host, rest) = s.split_at(end + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or("only `:port` may follow the address"),
        };
    }
    Ok(match s.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    })
}

fn parse_port(s: &str) -> Result<u16, &'static str> {
    s.parse()
        .ok()
        .filter(|port| *port > 0)
        .ok_or("the port must be 1..=65535, or `*` for any")
}

/// A domain name (letters, digits, `-`, dot-separated labels) or a bracketed IPv6 address.
fn check_host(host: &str) -> Result<(), &'static str> {
    if let Some(address) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let valid = !address.is_empty()
            && address
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
        return if valid {
            Ok(())
        } else {
            Err("not an IPv6 address")
        };
    }
    let valid = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if valid {
        Ok(())
    } else {
        Err("the host must be a domain name or an address (`*.` only as the first label)")
    }
}

/// CORS for one REST route that pages call, for the methods it serves them. Allowed origins get
/// tower-http's answers: the preflight (`Authorization` and `Content-Type` allowed, cached
/// [`PREFLIGHT_MAX_AGE`]) and `Access-Control-Allow-Origin` with `Retry-After` exposed (a page
/// must read it on 429). No credentials: requests authenticate with a bearer token, never a
/// cookie. Any other request passes it by and gets no CORS header at all.
#[derive(Clone)]
pub struct BrowserCors {
    policy: Arc<OriginPolicy>,
    cors: CorsLayer,
}

impl BrowserCors {
    pub fn new(policy: Arc<OriginPolicy>, methods: &[Method]) -> Self {
        let cors = CorsLayer::new()
            // Only the allowed origins reach it (see `browser_cors`).
            .allow_origin(AllowOrigin::mirror_request())
            .allow_methods(methods.to_vec())
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE);
        Self { policy, cors }
    }
}

/// The middleware of [`BrowserCors`] (`axum::middleware::from_fn_with_state`).
pub async fn browser_cors(
    State(gate): State<BrowserCors>,
    request: Request,
    next: Next,
) -> Response {
    match gate.policy.check(request.headers()) {
        RequestOrigin::Allowed => {
            let Ok(response) = gate.cors.layer(next).oneshot(request).await;
            response
        }
        RequestOrigin::Absent | RequestOrigin::Refused => {
            // A preflight from elsewhere meets the route's 405. The answer still varies by
            // `Origin`: a browser must not reuse it for a page of an allowed one.
            let mut response = next.run(request).await;
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("origin"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn policy(entries: &[&str], dev_mode: bool) -> OriginPolicy {
        let mut settings = Settings::defaults();
        if !dev_mode {
            settings.auth.jwt_secret =
                SecretString::from("a-configured-secret-of-at-least-32-bytes".to_string());
        }
        settings.server.allowed_origins = entries.iter().map(|e| e.to_string()).collect();
        OriginPolicy::from_settings(&settings).unwrap()
    }

    fn allows(policy: &OriginPolicy, origin: &str, host: &str) -> bool {
        policy.allows(&HeaderValue::from_str(origin).unwrap(), Some(host))
    }

    const GATEWAY: &str = "chat.example.com";

    #[test]
    fn exact_origins_match_scheme_host_and_port() {
        let p = policy(
            &["https://app.example.com", "http://app.example.com:8080"],
            false,
        );
        assert!(allows(&p, "https://app.example.com", GATEWAY));
        assert!(allows(&p, "https://APP.example.com:443", GATEWAY));
        assert!(allows(&p, "http://app.example.com:8080", GATEWAY));
        for other in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.test",
            "https://evil.test",
            "https://sub.app.example.com",
            "null",
            "",
            "https://app.example.com/",
        ] {
            assert!(!allows(&p, other, GATEWAY), "{other}");
        }
    }

    #[test]
    fn a_subdomain_pattern_matches_subdomains_at_any_depth_not_the_domain() {
        let p = policy(&["https://*.example.com"], false);
        assert!(allows(&p, "https://app.example.com", GATEWAY));
        assert!(allows(&p, "https://a.b.example.com", GATEWAY));
        for other in [
            "https://example.com",
            "https://evilexample.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.test",
        ] {
            assert!(!allows(&p, other, GATEWAY), "{other}");
        }
    }

    #[test]
    fn a_port_wildcard_matches_any_port() {
        let p = policy(&["http://localhost:*"], false);
        assert!(allows(&p, "http://localhost:5173", GATEWAY));
        assert!(allows(&p, "http://localhost", GATEWAY));
        assert!(!allows(&p, "https://localhost:5173", GATEWAY));
        assert!(!allows(&p, "http://127.0.0.1:5173", GATEWAY));
    }

    #[test]
    fn the_gateways_own_origin_is_its_host_header_whatever_the_scheme() {
        let p = policy(&[], false);
        // Behind a balancer that terminates TLS: the page is https, the gateway hears http.
        assert!(allows(&p, "https://chat.example.com", "chat.example.com"));
        assert!(allows(
            &p,
            "https://chat.example.com",
            "chat.example.com:443"
        ));
        assert!(allows(&p, "http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(allows(&p, "http://[::1]:8080", "[::1]:8080"));
        assert!(!allows(
            &p,
            "https://chat.example.com",
            "chat.example.com:8443"
        ));
        assert!(!allows(&p, "http://localhost:8080", "127.0.0.1:8080"));
        assert!(!allows(&p, "https://app.example.com", "chat.example.com"));
        let no_host = p.allows(&HeaderValue::from_static("https://chat.example.com"), None);
        assert!(!no_host);
    }

    #[test]
    fn dev_mode_allows_local_pages_by_default_and_a_key_allows_none() {
        let dev = policy(&[], true);
        assert!(allows(&dev, "http://localhost:3000", GATEWAY));
        assert!(allows(&dev, "http://127.0.0.1:5173", GATEWAY));
        assert!(!allows(&dev, "https://app.example.com", GATEWAY));
        let keyed = policy(&[], false);
        assert!(!allows(&keyed, "http://localhost:3000", GATEWAY));
        // A configured list replaces the dev-mode default.
        let listed = policy(&["https://app.example.com"], true);
        assert!(!allows(&listed, "http://localhost:3000", GATEWAY));
        assert!(allows(&listed, "https://app.example.com", GATEWAY));
    }

    #[test]
    fn requests_without_origin_are_not_judged() {
        let p = policy(&[], false);
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static(GATEWAY));
        assert_eq!(p.check(&headers), RequestOrigin::Absent);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.test"),
        );
        assert_eq!(p.check(&headers), RequestOrigin::Refused);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://chat.example.com"),
        );
        assert_eq!(p.check(&headers), RequestOrigin::Allowed);
    }

    #[test]
    fn invalid_entries_name_the_key_and_the_entry() {
        for entry in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/chat",
            "ftp://app.example.com",
            "https://*.example.com/",
            "https://app.*.com",
            "https://*",
            "*",
            "https://app.example.com:0",
            "https://app.example.com:99999",
            "https://user@app.example.com",
            "https://app..example.com",
            "https://[::1",
        ] {
            let mut settings = Settings::defaults();
            settings.server.allowed_origins = vec![entry.to_string()];
            let err = OriginPolicy::from_settings(&settings)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("server.allowed_origins") && err.contains(entry),
                "{entry}: {err}"
            );
        }
    }

    #[test]
    fn empty_entries_are_skipped_and_the_log_line_says_what_is_allowed() {
        let p = policy(
            &[
                " https://App.example.com:443 ",
                "",
                "https://*.example.com:*",
            ],
            false,
        );
        assert_eq!(
            p.to_string(),
            "https://app.example.com, https://*.example.com:* and the gateway's own origin"
        );
        assert_eq!(
            policy(&[""], true).to_string(),
            "http://localhost:*, http://127.0.0.1:* (dev mode's default) and the gateway's own origin"
        );
        assert_eq!(
            policy(&[], false).to_string(),
            "the gateway's own origin only"
        );
    }
}
