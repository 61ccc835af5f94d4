//! Scrubbing secrets out of text: every configured secret in every encoding a
//! crate might print it in, and the userinfo of any URL.
//!
//! The worker's own code keeps secrets in `SecretString`s, but third-party crates
//! log what they hold: at trace level lapin prints the SASL PLAIN response as a
//! byte list (`LongString([0, 103, 117, ...])`), and an error may quote a URL
//! with its `user:password@`. The log writer passes every line through a
//! [`Redactor`], so a secret cannot reach the log in any of the forms below,
//! whichever crate wrote it.

use std::borrow::Cow;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use secrecy::ExposeSecret;

use crate::config::{LedgerLocation, Settings};

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Shortest encoded form that is scrubbed: a shorter one (a one-byte password's
/// `112`) would match ordinary numbers and words and hide the log's meaning,
/// while revealing next to nothing.
const MIN_FORM_CHARS: usize = 4;

/// Replaces every configured secret, in each of its encodings, with [`REDACTED`].
#[derive(Default, Clone)]
pub struct Redactor {
    /// Every encoded form of every secret, longest first, so that a composite
    /// (the SASL response `\0user\0pass`) goes before the parts it contains.
    forms: Vec<String>,
}

/// Never prints the forms: they are the secrets.
impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("forms", &self.forms.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor for these raw secrets (passwords, keys, composite strings).
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut forms: Vec<String> = secrets
            .into_iter()
            .filter(|secret| !secret.as_ref().is_empty())
            .flat_map(|secret| encodings(secret.as_ref()))
            .filter(|form| form.len() >= MIN_FORM_CHARS)
            .collect();
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        Self { forms }
    }

    /// A redactor for every secret in `settings`: the broker's and Redis's
    /// passwords (alone, as `user:password` and as the SASL PLAIN response
    /// `\0user\0password`), and each vendor key and secret.
    pub fn for_settings(settings: &Settings) -> Self {
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        let mut url_secrets = |text: &str| {
            if let Ok(url) = url::Url::parse(text.trim()) {
                let user = percent_decoded(url.username());
                if let Some(password) = url.password().map(percent_decoded) {
                    secrets.push(format!("\0{user}\0{password}").into_bytes());
                    secrets.push(format!("{user}:{password}").into_bytes());
                    secrets.push(password.into_bytes());
                }
            }
        };
        url_secrets(settings.broker.amqp_url.expose_secret());
        if let LedgerLocation::Redis(url) = &settings.ledger.location {
            url_secrets(url);
        }
        if let Some(mimecast) = &settings.mimecast {
            secrets.push(mimecast.access_key.expose_secret().as_bytes().to_vec());
            secrets.push(mimecast.secret_key.expose_secret().to_vec());
            secrets.push(
                STANDARD
                    .encode(mimecast.secret_key.expose_secret())
                    .into_bytes(),
            );
            secrets.push(mimecast.app_key.expose_secret().as_bytes().to_vec());
        }
        if let Some(pncp) = &settings.pncp {
            secrets.push(pncp.application_key.expose_secret().as_bytes().to_vec());
            secrets.push(pncp.shared_secret.expose_secret().as_bytes().to_vec());
        }
        Self::new(secrets)
    }

    /// `text` with every secret form and every URL's userinfo replaced.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = url_userinfo(text);
        for form in &self.forms {
            if out.contains(form.as_str()) {
                out = Cow::Owned(out.replace(form.as_str(), REDACTED));
            }
        }
        out
    }
}

/// Every way a crate is likely to print `secret`: as text (plain, escaped as
/// Rust's `Debug` and JSON do, percent-encoded), as a list of decimal bytes
/// (`Debug` of a `Vec<u8>`, with and without spaces), as hex, and as base64 in
/// its four alphabets.
fn encodings(secret: &[u8]) -> Vec<String> {
    let mut forms = Vec::new();
    if let Ok(text) = std::str::from_utf8(secret) {
        forms.push(text.to_owned());
        forms.push(format!("{text:?}").trim_matches('"').to_owned());
        if let Ok(json) = serde_json::to_string(text) {
            forms.push(json.trim_matches('"').to_owned());
        }
    }
    forms.push(percent_encoded(secret));
    let decimal: Vec<String> = secret.iter().map(u8::to_string).collect();
    forms.push(decimal.join(", "));
    forms.push(decimal.join(","));
    forms.push(secret.iter().map(|b| format!("{b:02x}")).collect());
    forms.push(secret.iter().map(|b| format!("{b:02X}")).collect());
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(secret));
    }
    forms
}

/// Every byte but the unreserved ones as `%XX`, the way URLs carry userinfo.
fn percent_encoded(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with the password of every URL in it hidden (`scheme://user:***@host`),
/// so an error quoting a URL never carries its credentials. Userinfo without a
/// password may itself be a token (`https://TOKEN@host`), so it is hidden whole.
pub fn url_userinfo(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends at the path, query, fragment or the end of the word.
        let end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                if let Some((user, _password)) = userinfo.split_once(':') {
                    out.push_str(user);
                    out.push(':');
                }
                out.push_str("***@");
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_of_a_secret_is_replaced() {
        let redactor = Redactor::new(["s3cret-pw", "\0guest\0s3cret-pw"]);
        let sasl: Vec<u8> = b"\0guest\0s3cret-pw".to_vec();
        for line in [
            "password s3cret-pw".to_owned(),
            format!("response: LongString({sasl:?})"),
            format!("bytes {:?}", b"s3cret-pw".to_vec()),
            format!("b64 {}", STANDARD.encode(&sasl)),
            format!("b64 {}", URL_SAFE_NO_PAD.encode(b"s3cret-pw")),
            format!(
                "hex {}",
                "s3cret-pw"
                    .bytes()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
            format!("debug {:?}", "\0guest\0s3cret-pw"),
        ] {
            let out = redactor.redact(&line);
            assert!(out.contains(REDACTED), "{line} -> {out}");
            assert!(!out.contains("s3cret"), "{out}");
            assert!(!out.contains("115, 51, 99"), "{out}");
        }
        assert_eq!(redactor.redact("nothing here"), "nothing here");
    }

    #[test]
    fn the_userinfo_of_any_url_is_hidden() {
        assert_eq!(
            url_userinfo(
                "error sending request for url (http://u:p%40ss@host:81/api?x=1): refused"
            ),
            "error sending request for url (http://u:***@host:81/api?x=1): refused"
        );
        assert_eq!(
            url_userinfo("amqp://guest:guest@127.0.0.1:5672/%2f and https://plain.example/x"),
            "amqp://guest:***@127.0.0.1:5672/%2f and https://plain.example/x"
        );
        assert_eq!(
            url_userinfo("https://ghp_token@host/x"),
            "https://***@host/x"
        );
        assert_eq!(url_userinfo("no url"), "no url");
        assert_eq!(url_userinfo("a://"), "a://");
    }

    #[test]
    fn a_percent_encoded_password_is_known_in_both_forms() {
        assert_eq!(percent_decoded("p%40ss%2"), "p@ss%2");
        let redactor = Redactor::new(["p@ss-word"]);
        assert_eq!(
            redactor.redact("x p%40ss-word y"),
            format!("x {REDACTED} y")
        );
    }

    #[test]
    fn the_debug_form_hides_the_secrets() {
        let redactor = Redactor::new(["hunter22"]);
        assert!(!format!("{redactor:?}").contains("hunter22"));
    }
}
