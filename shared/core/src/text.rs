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
mod tests;
