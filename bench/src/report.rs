//! The printed result: markdown with one table per benchmark, medians over rounds, ratios
//! computed from figures of the same run, and each goal marked met or not.

use std::fmt::Write;

/// The median of `values` (the mean of the middle two when even); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// "met" or "NOT met", for a goal.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

/// Markdown text being built.
#[derive(Default)]
pub struct Report {
    text: String,
}

impl Report {
    /// A heading and a paragraph.
    pub fn section(&mut self, heading: &str, intro: &str) {
        let _ = write!(self.text, "\n### {heading}\n\n");
        if !intro.is_empty() {
            let _ = write!(self.text, "{intro}\n\n");
        }
    }

    /// A table header row.
    pub fn header(&mut self, cells: &[&str]) {
        self.row(cells.iter().map(|c| c.to_string()).collect());
        self.row(cells.iter().map(|_| "---".to_string()).collect());
    }

    /// A table row.
    pub fn row(&mut self, cells: Vec<String>) {
        let _ = writeln!(self.text, "| {} |", cells.join(" | "));
    }

    /// A line of text.
    pub fn line(&mut self, text: &str) {
        let _ = writeln!(self.text, "{text}");
    }

    /// The markdown so far; printed as it grows so a long run shows progress.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.text)
    }
}
