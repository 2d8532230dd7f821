//! The store's error type.

use std::path::Path;

/// Everything that can go wrong in the store. Messages are meant to be shown to users as-is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist (`what` reads like "function `hello`").
    #[error("{what} not found")]
    NotFound { what: String },
    /// The operation clashes with existing state (e.g. the function already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A caller-supplied value is unacceptable; `field` names it (e.g. `package`, `scale.max`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Stored data is damaged (bad spec JSON, package bytes not matching their digest...).
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether this is a `NotFound`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

impl From<skiff_core::SpecError> for StoreError {
    fn from(e: skiff_core::SpecError) -> Self {
        StoreError::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

/// Adds the path to an I/O error's message, keeping its kind.
pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| {
        StoreError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    }
}
