//! The key check and key files (data safety): a wrong or missing key is
//! refused before anything is written; key files are created only for an
//! empty store; errors never show a key or a password.
