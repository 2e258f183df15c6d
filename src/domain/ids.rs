//! Identities. Each is a UUID newtype so a task id can never be passed where a runtime id is
//! expected, and a claim token can never be printed by accident (it has no `Display`).

use std::fmt;

use uuid::Uuid;

/// A UUID newtype with the constructors and accessors every identity shares. Derives nothing
/// printable: each identity chooses its own `Debug` / `Display`.
macro_rules! uuid_newtype {
    ($(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses any UUID spelling.
            pub fn parse(text: &str) -> Option<Self> {
                Uuid::parse_str(text).ok().map(Self)
            }
        }
    };
}

/// Ids print as canonical lowercase hyphenated UUIDs: the form the spec promises on the wire.
macro_rules! printable_id {
    ($(#[$attr:meta])* $name:ident) => {
        uuid_newtype!($(#[$attr])* #[derive(Debug)] $name);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

printable_id!(
    /// A task's id.
    TaskId
);
printable_id!(
    /// A runtime's id, stable across re-registrations under the same name.
    RuntimeId
);
uuid_newtype!(
    /// The secret that fences every owner-side write to a claimed task.
    ///
    /// Deliberately without `Display`, and with a redacting `Debug`, so that it cannot slip
    /// into a log line.
    ClaimToken
);

impl ClaimToken {
    /// The token's wire form, for the claim response only.
    pub fn expose(&self) -> String {
        self.0.hyphenated().to_string()
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClaimToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_in_canonical_lowercase() {
        let id = TaskId::parse("6F9619FF-8B86-D011-B42D-00C04FC964FF").unwrap();
        assert_eq!(id.to_string(), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
    }

    #[test]
    fn claim_token_debug_does_not_reveal_the_token() {
        let token = ClaimToken::new_random();
        let printed = format!("{token:?}");
        assert!(!printed.contains(&token.expose()));
    }
}
