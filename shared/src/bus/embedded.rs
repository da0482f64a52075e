//! Embedded bus: being written (issue 4).
