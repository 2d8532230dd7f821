//! Route auth: a bearer token or an API-key header, checked against SHA-256 digests only
//! (`printf %s TOKEN | sha256sum`). The presented secret is hashed once and compared with every
//! digest in constant time, so neither the match nor its position leaks through timing.

use axum::http::{header, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use skiff_core::RouteAuth;

type Sha = [u8; 32];

/// A compiled auth check.
pub enum Check {
    Bearer(Box<[Sha]>),
    Header {
        name: HeaderName,
        digests: Box<[Sha]>,
    },
}

/// Why a request was refused, and the `WWW-Authenticate` challenge to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    pub message: &'static str,
    pub challenge: String,
}

fn decode(hex_digests: &[String]) -> Box<[Sha]> {
    hex_digests
        .iter()
        .filter_map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).ok().map(|_| out)
        })
        .collect()
}

/// Constant-time equality of two digests.
fn ct_eq(a: &Sha, b: &Sha) -> bool {
    let mut diff = 0u8;
    for i in 0..32 {
        diff |= a[i] ^ b[i];
    }
    std::hint::black_box(diff) == 0
}

/// Whether `secret`'s digest is one of `digests`, looking at all of them.
fn accepted(secret: &[u8], digests: &[Sha]) -> bool {
    let d: Sha = Sha256::digest(secret).into();
    digests.iter().fold(false, |ok, x| ok | ct_eq(&d, x))
}

impl Check {
    pub fn compile(auth: &RouteAuth) -> Check {
        match auth {
            RouteAuth::Bearer { tokens_sha256 } => Check::Bearer(decode(tokens_sha256)),
            RouteAuth::Header {
                name,
                values_sha256,
            } => Check::Header {
                // Validated by the spec as a header token.
                name: HeaderName::from_bytes(name.as_bytes())
                    .unwrap_or(HeaderName::from_static("x-api-key")),
                digests: decode(values_sha256),
            },
        }
    }

    /// Checks a request's headers; `realm` names the function in the challenge.
    pub fn verify(&self, headers: &HeaderMap, realm: &str) -> Result<(), Denied> {
        match self {
            Check::Bearer(digests) => {
                let token = headers
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes())
                    .and_then(|v| {
                        let (scheme, rest) = v.split_at_checked(7)?;
                        scheme
                            .eq_ignore_ascii_case(b"bearer ")
                            .then(|| rest.trim_ascii())
                    });
                match token {
                    Some(t) if !t.is_empty() && accepted(t, digests) => Ok(()),
                    Some(_) => Err(Denied {
                        message: "the bearer token is not valid",
                        challenge: format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
                    }),
                    None => Err(Denied {
                        message: "missing bearer token",
                        challenge: format!("Bearer realm=\"{realm}\""),
                    }),
                }
            }
            Check::Header { name, digests } => match headers.get(name) {
                Some(v) if accepted(v.as_bytes(), digests) => Ok(()),
                got => Err(Denied {
                    message: if got.is_some() {
                        "the API key is not valid"
                    } else {
                        "missing API key header"
                    },
                    challenge: format!("ApiKey realm=\"{realm}\", header=\"{name}\""),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(s: &str) -> String {
        hex::encode(Sha256::digest(s.as_bytes()))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn digest_of_test_matches_sha256sum() {
        // printf %s test | sha256sum
        assert_eq!(
            hex_of("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn bearer_tokens() {
        let c = Check::compile(&RouteAuth::Bearer {
            tokens_sha256: vec![hex_of("old"), hex_of("s3cret")],
        });
        assert!(c
            .verify(&headers(&[("authorization", "Bearer s3cret")]), "fx")
            .is_ok());
        assert!(c
            .verify(&headers(&[("authorization", "bearer old")]), "fx")
            .is_ok());
        let bad = c
            .verify(&headers(&[("authorization", "Bearer nope")]), "fx")
            .unwrap_err();
        assert!(bad.challenge.contains("invalid_token"), "{bad:?}");
        let missing = c.verify(&HeaderMap::new(), "fx").unwrap_err();
        assert_eq!(missing.challenge, "Bearer realm=\"fx\"");
        // The digest itself is not a token; other schemes are not bearer tokens.
        let digest = format!("Bearer {}", hex_of("s3cret"));
        assert!(c
            .verify(&headers(&[("authorization", &digest)]), "fx")
            .is_err());
        assert!(c
            .verify(&headers(&[("authorization", "Basic s3cret")]), "fx")
            .is_err());
        assert!(c
            .verify(&headers(&[("authorization", "Bearer ")]), "fx")
            .is_err());
    }

    #[test]
    fn header_keys() {
        let c = Check::compile(&RouteAuth::Header {
            name: "x-api-key".into(),
            values_sha256: vec![hex_of("k1")],
        });
        assert!(c.verify(&headers(&[("x-api-key", "k1")]), "fx").is_ok());
        let e = c
            .verify(&headers(&[("x-api-key", "k2")]), "fx")
            .unwrap_err();
        assert!(e.challenge.contains("header=\"x-api-key\""), "{e:?}");
        assert!(c
            .verify(&headers(&[("authorization", "Bearer k1")]), "fx")
            .is_err());
    }

    #[test]
    fn constant_time_compare_is_equality() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] ^= 1;
        assert!(!ct_eq(&a, &b));
    }
}
