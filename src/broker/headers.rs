//! What a header or property value the worker writes may be: bounded and printable.
//!
//! Header values come from outside (a producer's field names and `jobId`, a
//! vendor's codes and messages). Unbounded, one of them can exceed the AMQP frame
//! size, and RabbitMQ then closes the whole connection (`frame_too_large`); with
//! control characters, it can forge lines in whatever displays it. So every value
//! the publisher writes passes through here, and the full detail stays in the body.

/// Longest `x-error-message`, in bytes: a few lines of text, far below any frame size.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest `x-error-code`: a worker code, or a vendor's, with a bounded field name.
pub const MAX_CODE_BYTES: usize = 128;
/// Longest `x-job-id` and `correlation_id`: an AMQP short string holds 255 bytes.
pub const MAX_ID_BYTES: usize = 255;

/// Appended to a value that was cut.
const TRUNCATED: &str = "...[truncated]";

/// `value` as printable text of at most `max_bytes` bytes: control characters
/// and the invisible ones that reorder or hide text (bidi overrides, zero-width
/// marks) are written as `\u{..}` escapes, while printable letters of any script
/// are kept, so a `jobId` like `crm-é` stays the id its producer correlates on.
/// A value that does not fit is cut on a character boundary and ends with
/// `...[truncated]`, so a reader can tell it is not the whole text.
pub fn text(value: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max_bytes));
    for c in value.chars() {
        if is_printable(c) {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
        if out.len() > max_bytes {
            break;
        }
    }
    if out.len() > max_bytes {
        let mut end = max_bytes.saturating_sub(TRUNCATED.len());
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str(TRUNCATED);
    }
    out
}

/// Whether `c` shows as itself: not a control character, not one of the
/// invisible format characters that reorder or hide the text around them.
fn is_printable(c: char) -> bool {
    !c.is_control()
        && !matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}

/// An error code as a header value: letters, digits and `_ . : -` only (any other
/// character becomes `_`), at most [`MAX_CODE_BYTES`].
pub fn code(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(MAX_CODE_BYTES)
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '.' | ':' | '-' => c,
            _ => '_',
        })
        .collect();
    out.truncate(MAX_CODE_BYTES);
    out
}

/// A free-text message as a header value, at most [`MAX_MESSAGE_BYTES`], with
/// the userinfo of any URL in it hidden (a client error may quote one).
pub fn message(value: &str) -> String {
    text(
        &crate::telemetry::redact::url_userinfo(value),
        MAX_MESSAGE_BYTES,
    )
}

/// A job id as a header or `correlation_id`, at most [`MAX_ID_BYTES`].
pub fn job_id(value: &str) -> String {
    text(value, MAX_ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printable(value: &str) -> bool {
        value.chars().all(is_printable)
    }

    #[test]
    fn a_short_printable_value_is_kept_as_it_is() {
        assert_eq!(
            message("accountCode is required"),
            "accountCode is required"
        );
        assert_eq!(
            code("err_validation_accountCode"),
            "err_validation_accountCode"
        );
        assert_eq!(job_id("crm-evt-8f2c"), "crm-evt-8f2c");
    }

    #[test]
    fn a_huge_value_is_cut_with_a_marker() {
        let cut = message(&format!("unknown field {:?}", "k".repeat(200_000)));
        assert!(cut.len() <= MAX_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.starts_with("unknown field \"kkk"));
        assert!(cut.ends_with(TRUNCATED));
        let id = job_id(&"\u{e9}".repeat(200));
        assert!(id.len() <= MAX_ID_BYTES && printable(&id), "{id}");
    }

    #[test]
    fn control_and_invisible_characters_never_reach_a_header() {
        let value = message("line\r\nx-forged: 1\u{0}\u{202e}é");
        assert!(printable(&value), "{value}");
        assert!(value.contains("\\u{d}\\u{a}"), "{value}");
        assert!(value.contains("\\u{202e}"), "{value}");
        assert!(
            value.ends_with('é'),
            "letters of any script are kept: {value}"
        );
        assert_eq!(job_id("crm-é"), "crm-é");
        let code = code(&format!("err_validation_{}\n\u{0}{}", "ü", "x".repeat(500)));
        assert!(code.len() <= MAX_CODE_BYTES && printable(&code), "{code}");
        assert!(code.starts_with("err_validation__"), "{code}");
    }
}
