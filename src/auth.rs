//! Caller authentication: bearer tokens (hashed, compared in constant time) and client
//! certificates. Checked by the server's front layer on the HTTP/2 request head, before any
//! service runs, so an unauthenticated call is refused without its body being read or
//! decoded (a 64 MiB body costs what a 1 KiB one does). The token file holds SHA-256 hashes,
//! never tokens. `grpc.health.v1.Health` stays open for probes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::server::TcpConnectInfo;

/// Who made a call, as the audit log names it: `token:<id>`, `cert:<subject CN>`, both, or
/// `anonymous`. Inserted into each request's extensions by the server's front layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The hashed tokens of `--auth-tokens`: one `ID SHA256-HEX` per line, `#` comments.
#[derive(Debug, Default)]
pub struct TokenSet {
    entries: Vec<(String, [u8; 32])>,
}

/// SHA-256 of a token, as stored in the token file.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The token-file line for `id` and `token`.
pub fn token_line(id: &str, token: &str) -> String {
    format!("{id} {}", hex(&hash_token(token)))
}

impl TokenSet {
    /// Parses a token file; errors name the line and what was expected.
    pub fn parse(text: &str, path: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(id), Some(h), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!(
                    "--auth-tokens {path}, line {}: expected \"ID SHA256-HEX\", got {} fields",
                    i + 1,
                    line.split_whitespace().count()
                ));
            };
            let bytes = (0..h.len())
                .step_by(2)
                .map(|j| h.get(j..j + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .filter(|b| b.len() == 32 && h.len() == 64)
                .ok_or_else(|| {
                    format!(
                        "--auth-tokens {path}, line {}: expected a 64-digit hex SHA-256, got {} \
                         characters",
                        i + 1,
                        h.len()
                    )
                })?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&bytes);
            entries.push((id.to_string(), hash));
        }
        if entries.is_empty() {
            return Err(format!(
                "--auth-tokens {path}: expected at least one token, got none"
            ));
        }
        Ok(Self { entries })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-tokens {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The id of the token, comparing its hash with every entry in constant time.
    pub fn verify(&self, token: &str) -> Option<&str> {
        let h = hash_token(token);
        let mut found = None;
        for (id, want) in &self.entries {
            if bool::from(want.ct_eq(&h)) {
                found = Some(id.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Authentication settings shared by every request.
pub struct Auth {
    pub tokens: Option<Arc<TokenSet>>,
}

/// Common name (or the whole subject) of a DER certificate.
fn cert_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok().map(str::to_string));
    Some(cn.unwrap_or_else(|| subject.to_string()))
}

/// The certificate chain a TLS client presented, put on each of its requests by the
/// server's connection loop.
#[derive(Clone, Debug)]
pub struct PeerCerts(pub Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>);

pub fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
}

impl Auth {
    /// The caller of a request, or UNAUTHENTICATED. Health checks always pass.
    pub fn check<B>(&self, req: &http::Request<B>) -> Result<Caller, tonic::Status> {
        let cert = req
            .extensions()
            .get::<PeerCerts>()
            .and_then(|certs| certs.0.first().and_then(|c| cert_subject(c.as_ref())))
            .map(|s| format!("cert:{s}"));
        let Some(tokens) = &self.tokens else {
            return Ok(Caller(cert.unwrap_or_else(|| "anonymous".into())));
        };
        if req.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Ok(Caller("health-probe".into()));
        }
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = match header {
            None => {
                return Err(tonic::Status::unauthenticated(
                    "authorization: expected \"Bearer <token>\" metadata, got none",
                ))
            }
            Some(h) => match h.strip_prefix("Bearer ") {
                Some(t) => t.trim(),
                None => {
                    return Err(tonic::Status::unauthenticated(
                        "authorization: expected the \"Bearer\" scheme, got another",
                    ))
                }
            },
        };
        match tokens.verify(token) {
            Some(id) => Ok(Caller(match cert {
                Some(c) => format!("{c} token:{id}"),
                None => format!("token:{id}"),
            })),
            None => Err(tonic::Status::unauthenticated(
                "authorization: the bearer token is not one of the server's tokens",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_round_trip_and_errors() {
        let text = format!(
            "# pipeline tokens\n{}\n\n{}\n",
            token_line("pipeline-a", "s3cret-a"),
            token_line("pipeline-b", "s3cret-b")
        );
        let t = TokenSet::parse(&text, "t").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.verify("s3cret-a"), Some("pipeline-a"));
        assert_eq!(t.verify("s3cret-b"), Some("pipeline-b"));
        assert_eq!(t.verify("s3cret-c"), None);
        assert_eq!(t.verify(""), None);
        let e = TokenSet::parse("a b c\n", "t").unwrap_err();
        assert!(e.contains("line 1") && e.contains("3 fields"), "{e}");
        let e = TokenSet::parse("a abcd\n", "t").unwrap_err();
        assert!(e.contains("64-digit hex") && e.contains("got 4"), "{e}");
        assert!(TokenSet::parse("# none\n", "t")
            .unwrap_err()
            .contains("none"));
    }
}
