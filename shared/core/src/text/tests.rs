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
