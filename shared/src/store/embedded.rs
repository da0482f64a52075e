//! Embedded store: being written (issue 4).
