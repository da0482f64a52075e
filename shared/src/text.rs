//! Splitting agent replies into WhatsApp-sized message bodies.
//!
//! Twilio refuses a WhatsApp message whose body is longer than 1600
//! characters, and it counts those characters in UTF-16 code units (an emoji
//! outside the Basic Multilingual Plane counts 2). Agents regularly answer
//! with more than that, so a reply has to go out as several messages. Cutting
//! blindly at the limit would split words, sentences, URLs and even single
//! visible characters: half a flag renders as a stray letter, half a family
//! emoji as loose people, and half a surrogate pair is not valid text at all.
//! This module cuts each part as late as possible at the most natural
//! boundary that fits, so that every message reads well on its own.
//!
//! # Boundary preference
//!
//! Within the window of graphemes that fit in the limit, the candidate cuts
//! are ranked, best first:
//!
//! 1. **paragraph**: a whitespace run holding two or more line breaks (a blank
//!    line: `\n`, optional whitespace, `\n`; `\r\n` counts as one break and
//!    U+2029 PARAGRAPH SEPARATOR as two);
//! 2. **line**: a whitespace run holding one line break (`\n`, `\r`, `\r\n`,
//!    VT, FF, NEL, U+2028);
//! 3. **sentence**: a whitespace run right after a sentence terminator
//!    (`.` `!` `?` `…` `。` `！` `？` `｡` `؟` `।`), optionally followed by
//!    closing quotes, brackets or Markdown/WhatsApp emphasis marks
//!    (`"` `'` `”` `’` `»` `)` `]` `*` `_` `~` …). CJK text does not put spaces
//!    between sentences, so right after `。` `！` `？` `｡` (and any closers) a
//!    cut is also allowed with no whitespace at all;
//! 4. **word**: any whitespace run;
//! 5. **grapheme**: the end of the window, only when the window holds none of
//!    the above.
//!
//! A boundary of a higher rank also counts as one of every lower rank, and
//! within a rank the latest boundary wins. **The rule:** paragraph, line and
//! sentence boundaries are each taken only if the part they leave is at least
//! half the limit (`ceil(limit / 2)` UTF-16 units); otherwise the next rank is
//! tried. A word boundary is taken wherever it lies in the window, since the
//! only alternative is cutting a word (or a URL) in two; a grapheme cut is the
//! last resort.
//!
//! # What is guaranteed
//!
//! With `T = text.trim()` and parts `p0 … pn`:
//! `T == p0 + w0 + p1 + w1 + … + pn`, where each `wi` is the whitespace dropped
//! at the cut: non-empty and whitespace-only at a paragraph, line, sentence
//! or word boundary, empty at a grapheme cut or a space-less CJK sentence
//! cut (and at the forced cuts below). No part is empty, none is longer than
//! the limit, no part starts or ends with a whitespace-only grapheme cluster,
//! and no cut falls inside a grapheme cluster, so never inside a surrogate
//! pair either (the one exception is below). Whitespace that is part of a
//! larger cluster, such as a space carrying a combining mark, is not a
//! boundary: it stays, with its cluster, inside a part.
//!
//! # Degenerate inputs
//!
//! * A single grapheme cluster longer than the limit (say a letter carrying
//!   thousands of combining marks) cannot be sent whole, so, as the one
//!   exception to the rule above, it is cut at `char` boundaries, still never
//!   inside a surrogate pair.
//! * A limit below [`MIN_SENSIBLE_UTF16`] is a caller bug, but it is handled:
//!   splitting always terminates and never panics, and parts keep to any
//!   limit of 3 or more. Below 3 a part may go over the limit by holding one
//!   `char` that does not fit (with a limit of 0 every part is one `char`), or
//!   a space together with the mark it carries, since a part of whitespace
//!   alone could not be sent.
//!
//! Splitting takes time linear in the length of the text: each cut scans only
//! the window after the previous cut (plus the whitespace it drops), never
//! the whole remaining text.

use unicode_segmentation::UnicodeSegmentation;

/// Twilio's per-message limit, in UTF-16 code units.
///
/// Twilio rejects a WhatsApp body above this, so every outgoing reply is
/// split with it.
pub const MAX_BODY_UTF16: usize = 1600;

/// The smallest limit [`split_reply`] is meant for.
///
/// Below it one emoji sequence may not fit in a part; such limits are a
/// caller bug, which the splitter survives (see the module docs) but does not
/// serve well.
pub const MIN_SENSIBLE_UTF16: usize = 8;

/// Longest text wagate sends as one reply, in characters (Unicode scalar values): ten
/// WhatsApp messages. Without a cap, one admin call or one runaway agent answer would fan out
/// into hundreds of Twilio requests, each billed and each a message on the user's phone.
pub const MAX_REPLY_CHARS: usize = 16_000;

/// `text` cut to at most `max_chars` characters, at the last word boundary that fits, with an
/// ellipsis after the cut; `None` when it fits as it is. A text without whitespace is cut at a
/// grapheme boundary, so no visible character is split.
pub fn cap_reply(text: &str, max_chars: usize) -> Option<String> {
    let (end, _) = text.char_indices().nth(max_chars)?;
    // Room for the ellipsis, which counts as one character.
    let room = text[..end]
        .char_indices()
        .nth(max_chars.saturating_sub(1))
        .map_or(end, |(i, _)| i);
    let head = &text[..room];
    let at_word = head
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map(|(i, _)| i)
        .filter(|&i| !head[..i].trim_end().is_empty());
    let cut = match at_word {
        Some(i) => head[..i].trim_end(),
        None => {
            // The end of the last whole grapheme (of the full text) that fits.
            let last = text
                .grapheme_indices(true)
                .map(|(i, g)| i + g.len())
                .take_while(|&end| end <= room)
                .last()
                .unwrap_or(0);
            &head[..last]
        }
    };
    Some(format!("{cut}…"))
}

/// Splits `text` into parts of at most `max_utf16` UTF-16 code units each.
///
/// Exists because Twilio refuses WhatsApp bodies over [`MAX_BODY_UTF16`]
/// while agent replies can be longer. Cuts fall at the best boundary that
/// fits, as described in the module docs; the whitespace at a cut is
/// dropped and the parts are trimmed. Empty or whitespace-only text gives no
/// parts; text that fits gives one part, the text trimmed.
pub fn split_reply(text: &str, max_utf16: usize) -> Vec<String> {
    split_slices(text, max_utf16)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Length of `s` in UTF-16 code units.
///
/// Exists because Twilio counts a body's length in UTF-16 code units, not in
/// bytes or `char`s.
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// The parts as slices of `text`, so tests can see exactly where each lies.
fn split_slices(text: &str, limit: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    loop {
        // Only a forced char-level cut can leave whitespace at the front.
        rest = skip_blank_graphemes(rest);
        if rest.is_empty() {
            break;
        }
        match next_cut(rest, limit) {
            None => {
                parts.push(rest);
                break;
            }
            Some(cut) => {
                let (part, _) = rest.split_at(cut.part_end);
                parts.push(part);
                rest = &rest[cut.next_start..];
            }
        }
    }
    parts
}

/// Where to end the current part (`part_end`, exclusive) and where the next
/// one starts (`next_start`); the bytes between are dropped whitespace.
#[derive(Clone, Copy, Debug)]
struct Cut {
    part_end: usize,
    /// Length in UTF-16 units of the part this cut leaves.
    part_utf16: usize,
    next_start: usize,
}

/// Boundary ranks, worst first; the value indexes [`Best`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rank {
    Word = 0,
    Sentence = 1,
    Line = 2,
    Paragraph = 3,
}

/// The latest candidate cut of each rank or better.
#[derive(Default)]
struct Best([Option<Cut>; 4]);

impl Best {
    /// Records `cut`; candidates arrive in text order, so the latest wins.
    fn offer(&mut self, rank: Rank, cut: Cut) {
        if cut.part_end == 0 {
            return;
        }
        for slot in &mut self.0[..=rank as usize] {
            *slot = Some(cut);
        }
    }

    fn get(&self, rank: Rank) -> Option<Cut> {
        self.0[rank as usize]
    }
}

/// A run of whitespace-only grapheme clusters being scanned.
struct Run {
    start: usize,
    start_utf16: usize,
    breaks: usize,
    after_terminator: bool,
}

impl Run {
    fn rank(&self) -> Rank {
        match self.breaks {
            0 if self.after_terminator => Rank::Sentence,
            0 => Rank::Word,
            1 => Rank::Line,
            _ => Rank::Paragraph,
        }
    }
}

/// Finds the cut for the part at the front of `rest`, or `None` if all of
/// `rest` fits. `rest` is non-empty and starts and ends with a grapheme
/// cluster that is not whitespace-only.
fn next_cut(rest: &str, limit: usize) -> Option<Cut> {
    let mut best = Best::default();
    // UTF-16 units of the graphemes that fit so far.
    let mut used = 0usize;
    // Byte offset of the first grapheme that does not fit.
    let mut window_end: Option<usize> = None;
    let mut run: Option<Run> = None;
    // The text so far ends with a terminator and, optionally, closers.
    let mut after_terminator = false;
    let mut after_cjk_terminator = false;

    for g in Clusters::new(rest) {
        let idx = g.start;
        let beyond = window_end.is_some();
        if !beyond && used.saturating_add(g.utf16) > limit {
            window_end = Some(idx);
        }
        let outside = window_end.is_some();

        if g.blank {
            match &mut run {
                Some(r) => r.breaks += g.breaks,
                // A part may end at the window's end, not past it.
                None if beyond => break,
                None => {
                    run = Some(Run {
                        start: idx,
                        start_utf16: used,
                        breaks: g.breaks,
                        after_terminator,
                    });
                }
            }
            after_terminator = false;
            after_cjk_terminator = false;
        } else {
            if let Some(r) = run.take() {
                let cut = Cut {
                    part_end: r.start,
                    part_utf16: r.start_utf16,
                    next_start: idx,
                };
                best.offer(r.rank(), cut);
            } else if after_cjk_terminator && !beyond && !continues_sentence_end(g.first) {
                let cut = Cut {
                    part_end: idx,
                    part_utf16: used,
                    next_start: idx,
                };
                best.offer(Rank::Sentence, cut);
            }
            if outside {
                break;
            }
            if is_terminator(g.first) {
                after_terminator = true;
                after_cjk_terminator = is_cjk_terminator(g.first);
            } else if !is_closer(g.first) {
                after_terminator = false;
                after_cjk_terminator = false;
            }
        }
        if !outside {
            used += g.utf16;
        }
    }

    // `rest` ends with a non-blank grapheme, so a run still open here can
    // only mean the scan stopped early; its end is then the end of `rest`.
    if let Some(r) = run.take() {
        let cut = Cut {
            part_end: r.start,
            part_utf16: r.start_utf16,
            next_start: rest.len(),
        };
        best.offer(r.rank(), cut);
    }

    let window_end = window_end?;
    let min_preferred = limit.div_ceil(2);
    for rank in [Rank::Paragraph, Rank::Line, Rank::Sentence] {
        if let Some(cut) = best.get(rank)
            && cut.part_utf16 >= min_preferred
        {
            return Some(cut);
        }
    }
    if let Some(cut) = best.get(Rank::Word) {
        return Some(cut);
    }
    if window_end > 0 {
        return Some(Cut {
            part_end: window_end,
            part_utf16: used,
            next_start: window_end,
        });
    }
    Some(char_cut(rest, limit))
}

/// Cuts inside the first grapheme cluster of `rest`, which alone is longer
/// than `limit`: as many `char`s as fit, and at least one so splitting always
/// makes progress. A part of whitespace alone could not be sent, so a
/// leading whitespace `char` (a cluster's base under its marks) keeps the
/// `char` after it even past the limit; that can only happen for limits
/// under 3.
fn char_cut(rest: &str, limit: usize) -> Cut {
    let mut end = 0;
    let mut used = 0usize;
    let mut blank = true;
    for (idx, c) in rest.char_indices() {
        let c_utf16 = c.len_utf16();
        if idx > 0 && !blank && used + c_utf16 > limit {
            break;
        }
        blank &= c.is_whitespace();
        used += c_utf16;
        end = idx + c.len_utf8();
    }
    Cut {
        part_end: end,
        part_utf16: used,
        next_start: end,
    }
}

/// The extended grapheme clusters of a string with their byte offsets,
/// exactly as `grapheme_indices(true)` yields them.
///
/// Exists for speed: agent replies are mostly ASCII, and an ASCII `char`
/// followed by another (other than CR LF) always ends its cluster, so those
/// are yielded without running the segmenter, which is slow in debug builds.
/// Everything else is segmented by `unicode-segmentation` from the start of
/// the cluster; restarting there is sound because no segmentation rule looks
/// back across a cluster boundary.
struct Clusters<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Clusters<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, pos: 0 }
    }
}

/// One grapheme cluster and the facts about it the splitter needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cluster<'a> {
    start: usize,
    text: &'a str,
    utf16: usize,
    /// Whitespace only, so it may be dropped at a cut.
    blank: bool,
    /// Line breaks it holds, if blank.
    breaks: usize,
    first: char,
}

impl<'a> Iterator for Clusters<'a> {
    type Item = Cluster<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.pos;
        let rest = self.text.get(start..)?;
        let bytes = rest.as_bytes();
        let first_byte = *bytes.first()?;
        let ascii_alone = first_byte.is_ascii()
            && bytes
                .get(1)
                .is_none_or(|&next| next.is_ascii() && !(first_byte == b'\r' && next == b'\n'));
        let cluster = if ascii_alone {
            let (text, _) = rest.split_at(1);
            let first = char::from(first_byte);
            Cluster {
                start,
                text,
                utf16: 1,
                blank: first.is_ascii_whitespace() || first_byte == 0x0B,
                breaks: usize::from(matches!(first_byte, b'\n' | b'\r' | 0x0B | 0x0C)),
                first,
            }
        } else {
            let text = rest.graphemes(true).next().unwrap_or(rest);
            let blank = is_blank(text);
            Cluster {
                start,
                text,
                utf16: utf16_len(text),
                blank,
                breaks: if blank { line_breaks(text) } else { 0 },
                first: text.chars().next().unwrap_or_default(),
            }
        };
        self.pos = start + cluster.text.len();
        Some(cluster)
    }
}

/// `s` without its leading whitespace-only grapheme clusters.
fn skip_blank_graphemes(s: &str) -> &str {
    let start = Clusters::new(s)
        .find(|g| !g.blank)
        .map_or(s.len(), |g| g.start);
    &s[start..]
}

/// Whether a grapheme cluster is whitespace only (and so may be dropped at
/// a cut).
fn is_blank(g: &str) -> bool {
    g.chars().all(char::is_whitespace)
}

/// Line breaks in a whitespace-only grapheme cluster.
fn line_breaks(g: &str) -> usize {
    if g == "\r\n" {
        return 1;
    }
    g.chars()
        .map(|c| match c {
            '\n' | '\r' | '\u{0B}' | '\u{0C}' | '\u{85}' | '\u{2028}' => 1,
            '\u{2029}' => 2,
            _ => 0,
        })
        .sum()
}

fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '؟' | '।') || is_cjk_terminator(c)
}

/// Terminators after which CJK text starts the next sentence with no space.
fn is_cjk_terminator(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '｡')
}

/// Characters that may follow a terminator and still belong to its sentence.
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\''
            | '”'
            | '’'
            | '»'
            | '›'
            | ')'
            | ']'
            | '}'
            | '*'
            | '_'
            | '~'
            | '`'
            | '」'
            | '』'
            | '）'
            | '］'
            | '】'
            | '〕'
            | '〉'
            | '》'
            | '＂'
            | '＇'
    )
}

/// Whether `c`, right after a terminator, still belongs to the sentence end
/// (so a space-less CJK cut must not fall before it).
fn continues_sentence_end(c: char) -> bool {
    is_closer(c) || is_terminator(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    /// Byte offset of `inner` within `outer` (a subslice of it).
    fn offset_in(outer: &str, inner: &str) -> usize {
        let offset = (inner.as_ptr() as usize).wrapping_sub(outer.as_ptr() as usize);
        assert!(offset + inner.len() <= outer.len(), "not a subslice");
        offset
    }

    /// UTF-16 length of the grapheme cluster in `clusters` (the
    /// `grapheme_indices` of a text) that contains byte `at` strictly inside
    /// it, or 0 if `at` is a cluster boundary.
    fn cluster_straddling(clusters: &[(usize, &str)], at: usize) -> usize {
        let i = clusters.partition_point(|&(idx, _)| idx <= at);
        match i.checked_sub(1).map(|i| clusters[i]) {
            Some((idx, g)) if idx < at && at < idx + g.len() => utf16_len(g),
            _ => 0,
        }
    }

    fn ends_with_cjk_sentence(part: &str) -> bool {
        part.graphemes(true)
            .rev()
            .filter_map(|g| g.chars().next())
            .find(|&c| !is_closer(c))
            .is_some_and(is_cjk_terminator)
    }

    /// Splits `text` and checks every documented property; returns the parts.
    fn check(text: &str, limit: usize) -> Vec<String> {
        let slices = split_slices(text, limit);
        let parts = split_reply(text, limit);
        assert_eq!(parts, slices, "split_reply must return the slices");

        let trimmed = text.trim();
        if trimmed.is_empty() {
            assert!(parts.is_empty(), "blank text gives no parts");
            return parts;
        }
        if utf16_len(trimmed) <= limit {
            assert_eq!(parts, vec![trimmed.to_owned()], "fitting text is one part");
        }

        let clusters: Vec<(usize, &str)> = trimmed.grapheme_indices(true).collect();
        let mut rebuilt = String::new();
        let mut pos = 0;
        for (i, part) in slices.iter().enumerate() {
            assert!(!part.is_empty(), "empty part");
            if limit >= 3 {
                assert!(utf16_len(part) <= limit, "part over limit: {part:?}");
            }
            let start = offset_in(trimmed, part);
            assert!(start >= pos, "parts overlap");
            let gap = &trimmed[pos..start];
            if i == 0 {
                assert!(gap.is_empty());
            } else {
                assert!(
                    gap.chars().all(char::is_whitespace),
                    "gap not blank: {gap:?}"
                );
                if gap.is_empty() {
                    let prev = slices[i - 1];
                    assert!(
                        !prev.graphemes(true).any(is_blank) || ends_with_cjk_sentence(prev),
                        "empty gap after a part that had a word boundary: {prev:?}"
                    );
                }
                for at in [pos, start] {
                    let straddled = cluster_straddling(&clusters, at);
                    assert!(
                        straddled == 0 || straddled > limit,
                        "cut at {at} inside a grapheme cluster that fits"
                    );
                }
            }
            let first = part.graphemes(true).next().unwrap_or_default();
            let last = part.graphemes(true).next_back().unwrap_or_default();
            assert!(!is_blank(first), "part starts blank: {part:?}");
            assert!(!is_blank(last), "part ends blank: {part:?}");
            rebuilt.push_str(gap);
            rebuilt.push_str(part);
            pos = start + part.len();
        }
        assert_eq!(pos, trimmed.len(), "text lost at the end");
        assert_eq!(rebuilt, trimmed);
        parts
    }

    fn utf16_lens(parts: &[String]) -> Vec<usize> {
        parts.iter().map(|p| utf16_len(p)).collect()
    }

    #[test]
    fn utf16_len_counts_code_units() {
        assert_eq!(utf16_len(""), 0);
        assert_eq!(utf16_len("abc"), 3);
        assert_eq!(utf16_len("é"), 1);
        assert_eq!(utf16_len("😀"), 2);
        assert_eq!(utf16_len("🇺🇸"), 4);
        assert_eq!(utf16_len("👨‍👩‍👧‍👦"), 11);
        assert_eq!(utf16_len("日本"), 2);
    }

    #[test]
    fn blank_text_gives_no_parts() {
        assert!(check("", 1600).is_empty());
        assert!(check("   \n\t \r\n  ", 1600).is_empty());
        assert!(check("\u{3000}\u{2028}", 10).is_empty());
    }

    #[test]
    fn fitting_text_is_one_trimmed_part() {
        assert_eq!(check("  hello\n\nworld  \n", 1600), ["hello\n\nworld"]);
    }

    #[test]
    fn exactly_the_limit_is_one_part() {
        let text = "a".repeat(MAX_BODY_UTF16);
        assert_eq!(check(&text, MAX_BODY_UTF16), std::slice::from_ref(&text));
        let emoji = "😀".repeat(MAX_BODY_UTF16 / 2);
        assert_eq!(check(&emoji, MAX_BODY_UTF16).len(), 1);
        let padded = format!("\n  {text}  \n");
        assert_eq!(check(&padded, MAX_BODY_UTF16), [text]);
    }

    #[test]
    fn one_over_the_limit_is_two_parts() {
        let words = "word ".repeat(320) + "x"; // 1601 units
        assert_eq!(utf16_len(&words), 1601);
        let parts = check(&words, MAX_BODY_UTF16);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], "x");

        let solid = "a".repeat(1601);
        assert_eq!(utf16_lens(&check(&solid, MAX_BODY_UTF16)), [1600, 1]);

        // 1599 units then an emoji: the surrogate pair must not be split.
        let text = "a".repeat(1599) + "😀";
        assert_eq!(utf16_lens(&check(&text, MAX_BODY_UTF16)), [1599, 2]);
    }

    #[test]
    fn paragraph_beats_later_line_sentence_and_word() {
        let text = "aaaaaaaa aaaaaaaa.\n\nbbbbbb. bbbbbb\ncccc ccccccc dd";
        let parts = check(text, 30);
        assert_eq!(parts[0], "aaaaaaaa aaaaaaaa.");
        assert_eq!(parts[1], "bbbbbb. bbbbbb\ncccc ccccccc dd");
    }

    #[test]
    fn blank_line_may_hold_other_whitespace() {
        let text = "aaaaaaaaaaaaaaaaaa \n \t \r\n bbbbbbbbbbbbbbb ccccccc";
        assert_eq!(check(text, 30)[0], "aaaaaaaaaaaaaaaaaa");
        let sep = "aaaaaaaaaaaaaaaaaa\u{2029}bbbbb\nbbbbbbbbbb ccccccc";
        assert_eq!(check(sep, 30)[0], "aaaaaaaaaaaaaaaaaa");
    }

    #[test]
    fn line_beats_later_sentence_and_word() {
        let text = "aaaaaaaaaaaaaaaaa\r\nbbbbb. bbbbb ccccccc dddd";
        let parts = check(text, 30);
        assert_eq!(parts, ["aaaaaaaaaaaaaaaaa", "bbbbb. bbbbb ccccccc dddd"]);
    }

    #[test]
    fn sentence_beats_later_word() {
        let text = "Aaaa aaaa aaaa aaaa! Bbbb bbbb bbbb bbbb";
        assert_eq!(check(text, 30)[0], "Aaaa aaaa aaaa aaaa!");
        for end in ["?", "…", ".\"", ".)", "!*", "?”"] {
            let text = format!("Aaaa aaaa aaaa aaaa{end} Bbbb bbbb bbbb bbbb");
            assert_eq!(check(&text, 30)[0], format!("Aaaa aaaa aaaa aaaa{end}"));
        }
    }

    #[test]
    fn not_a_sentence_end_without_terminator() {
        // "e.g" has no space after its dot; "3.14" neither.
        let text = "Take e.g.the value 3.14 and more words here";
        assert_eq!(check(text, 30)[0], "Take e.g.the value 3.14 and");
    }

    #[test]
    fn word_beats_grapheme() {
        let text = format!("aaaa {}", "b".repeat(29));
        assert_eq!(check(&text, 30), ["aaaa".to_owned(), "b".repeat(29)]);
    }

    #[test]
    fn grapheme_cut_when_no_whitespace() {
        let text = "x".repeat(75);
        assert_eq!(utf16_lens(&check(&text, 30)), [30, 30, 15]);
    }

    #[test]
    fn too_early_paragraph_falls_back_to_line() {
        // The paragraph break would leave 5 units; the line break leaves 20.
        let text = "aaaaa\n\nbbbbbbbbbbbbbb\nccccc ccccc ccccc ccccc";
        assert_eq!(check(text, 30)[0], "aaaaa\n\nbbbbbbbbbbbbbb");
    }

    #[test]
    fn too_early_sentence_falls_back_to_word() {
        let text = "Hi. aaaaaaaaa bbbbbbbbbbb cccccccccc dddd";
        assert_eq!(check(text, 30)[0], "Hi. aaaaaaaaa bbbbbbbbbbb");
    }

    #[test]
    fn everything_too_early_still_prefers_word_to_grapheme() {
        let text = "Hi.\n\nyes zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";
        let parts = check(text, 30);
        assert_eq!(parts[0], "Hi.\n\nyes");
    }

    #[test]
    fn half_limit_is_enough_for_preference() {
        // Exactly 15 units before the blank line with a limit of 30.
        let text = "aaaaaaaaaaaaaaa\n\nbbbbbbbbb bbbbbbbbbbbbbbb";
        assert_eq!(check(text, 30)[0], "aaaaaaaaaaaaaaa");
        // 14 units is not: the later word boundary wins.
        let text = "aaaaaaaaaaaaaa\n\nbbbbbbbbb bbbbbbbbbbbbbbb";
        assert_eq!(check(text, 30)[0], "aaaaaaaaaaaaaa\n\nbbbbbbbbb");
    }

    #[test]
    fn whitespace_at_the_window_edge_is_a_boundary() {
        // The part fills the limit exactly; the space after it is dropped.
        let text = format!("{} {}", "a".repeat(30), "b".repeat(10));
        assert_eq!(utf16_lens(&check(&text, 30)), [30, 10]);
        // A blank line straddling the window edge is a paragraph boundary.
        let text = format!("aaaa. {}\n\n{}", "a".repeat(24), "b".repeat(10));
        assert_eq!(check(&text, 30)[1], "b".repeat(10));
    }

    #[test]
    fn long_whitespace_runs_are_dropped() {
        let text = format!("{}{}{}", "a".repeat(20), " ".repeat(5000), "b".repeat(20));
        assert_eq!(check(&text, 30), ["a".repeat(20), "b".repeat(20)]);
    }

    #[test]
    fn flags_are_not_split() {
        // 9 units, then a flag (4) would overflow 10: cut before the flag.
        let text = "aaaaaaaaa🇺🇸🇫🇷🇯🇵";
        let parts = check(text, 10);
        assert_eq!(parts, ["aaaaaaaaa", "🇺🇸🇫🇷", "🇯🇵"]);
        // A run of flags with an odd offset still pairs correctly.
        let flags = "a🇺🇸🇫🇷🇯🇵🇩🇪🇮🇹";
        for part in check(flags, 9).iter().skip(1) {
            assert_eq!(utf16_len(part) % 4, 0, "{part:?}");
        }
    }

    #[test]
    fn zwj_sequences_are_not_split() {
        let family = "👨‍👩‍👧‍👦"; // 11 units
        let text = format!("{}{family}{family}", "a".repeat(10));
        assert_eq!(
            check(&text, 16),
            ["a".repeat(10), family.to_owned(), family.to_owned()]
        );
        let thumbs = "👍🏽".repeat(5); // 4 units each
        assert_eq!(utf16_lens(&check(&thumbs, 10)), [8, 8, 4]);
    }

    #[test]
    fn combining_marks_stay_on_their_base() {
        let e = "e\u{301}\u{323}"; // 3 units, one cluster
        let text = format!("aaaaaaaa{e}{e}{e}");
        let parts = check(&text, 10);
        assert_eq!(parts, ["aaaaaaaa".to_owned(), format!("{e}{e}{e}")]);
        // Hangul jamo and Devanagari clusters.
        let hangul = "\u{1100}\u{1161}\u{11A8}".repeat(7);
        assert_eq!(utf16_lens(&check(&hangul, 8)), [6, 6, 6, 3]);
        let hindi = "नमस्ते दुनिया ".repeat(10);
        check(&hindi, 9);
    }

    #[test]
    fn space_with_combining_mark_is_not_a_boundary() {
        // " \u{301}" is one cluster, so the cut cannot drop that space.
        let text = "aaaaaaaaaaaa \u{301}bbbbbbbbbbbbbbbbbbbbbb";
        let parts = check(text, 20);
        assert_eq!(parts[0], "aaaaaaaaaaaa \u{301}bbbbbb");
    }

    #[test]
    fn cjk_without_spaces_cuts_after_sentence_ends() {
        let text =
            "今日は良い天気です。明日は雨が降るでしょう。「傘を持って行きなさい。」と母は言った。";
        let parts = check(text, 25);
        assert_eq!(
            parts,
            [
                "今日は良い天気です。明日は雨が降るでしょう。",
                "「傘を持って行きなさい。」と母は言った。"
            ]
        );
        let chinese = "你好吗？我很好！谢谢你的关心。".repeat(6);
        for part in check(&chinese, 30) {
            assert!(part.ends_with(['。', '？', '！']), "{part:?}");
        }
    }

    #[test]
    fn cjk_without_punctuation_cuts_at_the_limit() {
        let text = "漢".repeat(100);
        assert_eq!(utf16_lens(&check(&text, 30)), [30, 30, 30, 10]);
        // Supplementary-plane ideographs are 2 units each.
        let text = "𠀋".repeat(20);
        assert_eq!(utf16_lens(&check(&text, 9)), [8, 8, 8, 8, 8]);
    }

    #[test]
    fn cjk_cut_never_splits_double_punctuation() {
        let text = format!("{}？！{}", "な".repeat(8), "に".repeat(20));
        assert_eq!(check(&text, 12)[0], format!("{}？！", "な".repeat(8)));
    }

    #[test]
    fn long_url_moves_whole_to_the_next_part_when_it_fits() {
        let url = format!("https://example.com/{}", "x".repeat(1000));
        let text = format!("{} {url} after", "see ".repeat(150).trim_end());
        let parts = check(&text, MAX_BODY_UTF16);
        assert_eq!(parts.len(), 2);
        assert!(parts[1].starts_with(&url), "URL must not be cut");
    }

    #[test]
    fn url_longer_than_the_limit_is_cut_at_the_limit() {
        let url = format!("https://example.com/{}", "y".repeat(4000));
        let text = format!("Link: {url}\n\nThanks!");
        let parts = check(&text, MAX_BODY_UTF16);
        assert_eq!(parts[0], "Link:");
        assert_eq!(utf16_len(&parts[1]), MAX_BODY_UTF16);
        assert_eq!(parts.len(), 4);
        assert!(parts[3].ends_with("yyy\n\nThanks!"));
    }

    #[test]
    fn oversized_cluster_is_cut_at_char_boundaries() {
        let text = format!("a{}", "\u{301}".repeat(5000));
        let parts = check(&text, MAX_BODY_UTF16);
        assert_eq!(utf16_lens(&parts), [1600, 1600, 1600, 201]);
        assert_eq!(parts.concat(), text);
        // A ZWJ family wider than the limit is cut between chars, never
        // inside a surrogate pair.
        let parts = check("👨‍👩‍👧‍👦", 8);
        assert!(parts.iter().all(|p| utf16_len(p) <= 8));
        assert_eq!(parts.concat(), "👨‍👩‍👧‍👦");
    }

    #[test]
    fn tiny_limits_terminate_without_panicking() {
        let text = "Hi 😀 there 🇺🇸!\n\nOK e\u{301} 日本。語 👨‍👩‍👧‍👦";
        for limit in 0..MIN_SENSIBLE_UTF16 {
            let parts = check(text, limit);
            assert!(!parts.is_empty());
            let lone_chars = parts.iter().all(|p| p.chars().count() == 1);
            assert!(
                parts.iter().all(|p| utf16_len(p) <= limit.max(2)) || lone_chars,
                "limit {limit}: {parts:?}"
            );
        }
        assert_eq!(check("ab c", 0), ["a", "b", "c"]);
        // A space carrying a mark is never sent as a blank part.
        assert_eq!(check("𑵐 \u{ac7}", 0), ["𑵐", " \u{ac7}"]);
        assert_eq!(check("x \u{1D165}", 2), ["x", " \u{1D165}"]);
        assert_eq!(check("😀😀", 1), ["😀", "😀"]);
    }

    #[test]
    fn huge_limit_does_not_overflow() {
        assert_eq!(check(" a b ", usize::MAX), ["a b"]);
    }

    #[test]
    fn megabyte_reply_splits_quickly() {
        let paragraph = "Lorem ipsum dolor sit amet, consectetur adipiscing elit 😀. \
            Sed do eiusmod tempor incididunt ut labore.\nEt dolore magna 🇺🇸 aliqua.\n\n";
        let text = paragraph.repeat(1_000_000 / paragraph.len() + 1);
        let solid = "漢字".repeat(180_000);
        let blank = format!("a{}b", " ".repeat(1_000_000));
        for input in [&text, &solid, &blank] {
            let started = Instant::now();
            let parts = split_reply(input, MAX_BODY_UTF16);
            let elapsed = started.elapsed();
            assert!(!parts.is_empty());
            // Generous so a loaded CI machine passes; a quadratic split
            // takes minutes here.
            assert!(elapsed.as_secs_f64() < 5.0, "took {elapsed:?}");
        }
    }

    /// A slow, direct reading of the documented rule, to check the streaming
    /// scan against: list every boundary of the remaining text, keep those
    /// whose part fits, and pick by rank. Only for texts with no cluster
    /// longer than `limit` (so no char-level cut is needed).
    fn reference_split(text: &str, limit: usize) -> Vec<&str> {
        let t = text.trim();
        let cl: Vec<(usize, &str)> = t.grapheme_indices(true).collect();
        let n = cl.len();
        let start_of = |i: usize| cl.get(i).map_or(t.len(), |c| c.0);
        let first = |i: usize| cl[i].1.chars().next().unwrap_or_default();
        let mut parts = Vec::new();
        let mut i = 0;
        loop {
            while i < n && is_blank(cl[i].1) {
                i += 1;
            }
            if i == n {
                return parts;
            }
            let width = |j: usize| cl[i..j].iter().map(|c| utf16_len(c.1)).sum::<usize>();
            if width(n) <= limit {
                parts.push(&t[start_of(i)..]);
                return parts;
            }
            // (part end index, next start index, rank, part width)
            let mut cands: Vec<(usize, usize, Rank, usize)> = Vec::new();
            for j in i + 1..n {
                let w = width(j);
                if w > limit {
                    break;
                }
                // Terminator (and which kind) ending cl[i..j] past closers.
                let mut k = j;
                while k > i && !is_blank(cl[k - 1].1) && is_closer(first(k - 1)) {
                    k -= 1;
                }
                let term = (k > i && !is_blank(cl[k - 1].1) && is_terminator(first(k - 1)))
                    .then(|| first(k - 1));
                if is_blank(cl[j].1) && !is_blank(cl[j - 1].1) {
                    let mut end = j;
                    while end < n && is_blank(cl[end].1) {
                        end += 1;
                    }
                    let breaks: usize = cl[j..end].iter().map(|c| line_breaks(c.1)).sum();
                    let rank = match breaks {
                        0 if term.is_some() => Rank::Sentence,
                        0 => Rank::Word,
                        1 => Rank::Line,
                        _ => Rank::Paragraph,
                    };
                    cands.push((j, end, rank, w));
                } else if !is_blank(cl[j].1)
                    && !is_blank(cl[j - 1].1)
                    && term.is_some_and(is_cjk_terminator)
                    && !continues_sentence_end(first(j))
                {
                    cands.push((j, j, Rank::Sentence, w));
                }
            }
            let latest = |min: Rank| {
                cands
                    .iter()
                    .rfind(|c| c.2 as usize >= min as usize)
                    .copied()
            };
            let chosen = [Rank::Paragraph, Rank::Line, Rank::Sentence]
                .into_iter()
                .filter_map(latest)
                .find(|c| c.3 * 2 >= limit)
                .or_else(|| latest(Rank::Word))
                .map(|c| (c.0, c.1))
                .unwrap_or_else(|| {
                    let mut j = i + 1;
                    while width(j + 1) <= limit {
                        j += 1;
                    }
                    (j, j)
                });
            parts.push(&t[start_of(i)..start_of(chosen.0)]);
            i = chosen.1;
        }
    }

    /// Text pieces that stress the splitter: every boundary kind, multi-unit
    /// clusters, and whitespace glued to marks.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z]{1,12}",
            3 => Just(" ".to_owned()),
            2 => Just("\n".to_owned()),
            1 => Just("\n\n".to_owned()),
            1 => Just("\r\n".to_owned()),
            1 => Just("\n \t\n".to_owned()),
            1 => Just("\t".to_owned()),
            2 => prop::sample::select(vec![".", "!", "?", "…", ". ", "! ", "?\" ", ".) ", "*"])
                .prop_map(str::to_owned),
            2 => prop::sample::select(vec![
                "😀", "🇺🇸", "🇫🇷", "👨‍👩‍👧‍👦", "👍🏽", "❤️", "🏳️‍🌈", "e\u{301}", "\u{301}",
                " \u{301}", "\u{600}", "\u{200D}", "\u{FE0F}", "क्षि", "\u{1100}\u{1161}",
            ])
            .prop_map(str::to_owned),
            2 => "[\u{4E00}-\u{4E80}]{1,10}",
            1 => prop::sample::select(vec!["。", "！", "？", "」", "\u{3000}", "\u{2028}", "\u{2029}", "\u{A0}", "\u{85}"])
                .prop_map(str::to_owned),
            1 => any::<char>().prop_map(String::from),
        ]
    }

    fn reply_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::collection::vec(piece(), 0..300).prop_map(|v| v.concat()),
            1 => any::<String>(),
            1 => "\\PC{0,400}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn split_keeps_every_property(text in reply_text(), limit in 8usize..200) {
            check(&text, limit);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn split_follows_the_reference_rule(text in reply_text(), limit in 8usize..120) {
            let oversized = text.graphemes(true).any(|g| utf16_len(g) > limit);
            prop_assume!(!oversized);
            prop_assert_eq!(split_slices(&text, limit), reference_split(&text, limit));
        }

        #[test]
        fn clusters_match_the_segmenter(text in reply_text()) {
            let ours: Vec<_> = Clusters::new(&text).map(|g| (g.start, g.text)).collect();
            let theirs: Vec<_> = text.grapheme_indices(true).collect();
            prop_assert_eq!(ours, theirs);
            for g in Clusters::new(&text) {
                prop_assert_eq!(g.utf16, utf16_len(g.text));
                prop_assert_eq!(g.blank, is_blank(g.text));
                prop_assert_eq!(g.breaks, if g.blank { line_breaks(g.text) } else { 0 });
                prop_assert_eq!(Some(g.first), g.text.chars().next());
            }
        }

        #[test]
        fn split_survives_any_limit(text in reply_text(), limit in 0usize..8) {
            check(&text, limit);
        }
    }

    #[test]
    fn a_reply_over_the_cap_is_cut_at_a_word_with_an_ellipsis() {
        assert_eq!(cap_reply("short enough", 20), None);
        assert_eq!(cap_reply("exactly20charactersX", 20), None);
        let capped = cap_reply("one two three four", 12).unwrap();
        assert_eq!(capped, "one two…");
        assert!(capped.chars().count() <= 12);
        // No whitespace: cut between graphemes, never inside a flag or an accented letter.
        let flags = "🇫🇷".repeat(10);
        let capped = cap_reply(&flags, 7).unwrap();
        assert_eq!(capped, format!("{}…", "🇫🇷".repeat(3)));
        let accents = "e\u{301}".repeat(10);
        assert_eq!(
            cap_reply(&accents, 6).unwrap(),
            format!("{}…", "e\u{301}".repeat(2))
        );
        let long = "word ".repeat(MAX_REPLY_CHARS);
        let capped = cap_reply(&long, MAX_REPLY_CHARS).unwrap();
        assert!(capped.chars().count() <= MAX_REPLY_CHARS);
        assert!(
            capped.ends_with("word…"),
            "{}",
            &capped[capped.len() - 20..]
        );
    }
}
