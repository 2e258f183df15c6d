//! Opaque ListTasks page tokens: a versioned (created_at, id) cursor in URL-safe base64.
//! Clients must treat them as opaque; the format may change between versions.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;

use crate::domain::{Error, Result, TaskId};
use crate::store::PageCursor;

const VERSION: &str = "v1";

pub(crate) fn encode(cursor: PageCursor) -> String {
    let raw = format!(
        "{VERSION}|{}|{}",
        cursor.created_at.timestamp_micros(),
        cursor.id
    );
    URL_SAFE_NO_PAD.encode(raw)
}

/// A ListRuntimes token: the name the next page starts after.
pub(crate) fn encode_name(name: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{VERSION}|runtime|{name}"))
}

/// Empty = the first page.
pub(crate) fn decode_name(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok());
    raw.as_deref()
        .and_then(|raw| raw.strip_prefix(&format!("{VERSION}|runtime|")))
        .map(|name| Some(name.to_owned()))
        .ok_or_else(|| Error::invalid("page_token", "is not a token this server issued"))
}

/// Empty = the first page.
pub(crate) fn decode(token: &str) -> Result<Option<PageCursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    parse(token)
        .map(Some)
        .ok_or_else(|| Error::invalid("page_token", "is not a token this server issued"))
}

fn parse(token: &str) -> Option<PageCursor> {
    let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    let mut parts = raw.split('|');
    if parts.next()? != VERSION {
        return None;
    }
    let micros: i64 = parts.next()?.parse().ok()?;
    let id = TaskId::parse(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some(PageCursor {
        created_at: DateTime::from_timestamp_micros(micros)?,
        id,
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    #[test]
    fn a_token_round_trips_to_the_same_cursor() {
        let created_at = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        let cursor = PageCursor {
            created_at,
            id: TaskId::new_random(),
        };
        assert_eq!(decode(&encode(cursor)).unwrap(), Some(cursor));
    }

    #[test]
    fn garbage_tokens_are_invalid_arguments() {
        assert!(decode("not-a-token").is_err());
        assert!(decode(&URL_SAFE_NO_PAD.encode("v9|1|x")).is_err());
        assert_eq!(decode("").unwrap(), None);
    }
}
