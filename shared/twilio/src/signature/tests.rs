use super::*;
use proptest::prelude::*;

fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const TOKEN: &[u8] = b"12345";
const BASE_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

/// V1 params (twilio-python / twilio-node SDK tests).
fn v1_params() -> Vec<(String, String)> {
    p(&[
        ("CallSid", "CA1234567890ABCDE"),
        ("Digits", "1234"),
        ("From", "+14158675309"),
        ("To", "+18005551212"),
        ("Caller", "+14158675309"),
    ])
}

const V8_TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";
const V8_URL: &str = "https://gateway.example.com/twilio/whatsapp/inbound";

/// V8 form body, decoded (WhatsApp-shaped inbound message).
fn v8_params(body: Option<&str>) -> Vec<(String, String)> {
    let mut params = p(&[
        ("SmsMessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("NumMedia", "0"),
        ("ProfileName", "Alice"),
        ("MessageType", "text"),
        ("SmsSid", "SM0123456789abcdef0123456789abcdef"),
        ("WaId", "14155550100"),
        ("SmsStatus", "received"),
        ("To", "whatsapp:+14155238886"),
        ("NumSegments", "1"),
        ("ReferralNumMedia", "0"),
        ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", "whatsapp:+14155550100"),
        ("ApiVersion", "2010-04-01"),
    ]);
    if let Some(body) = body {
        params.push(("Body".to_owned(), body.to_owned()));
    }
    params
}

fn candidates(url: &str) -> Vec<String> {
    url_candidates(url).into_iter().flatten().collect()
}

#[test]
fn v1_sdk_vector() {
    let params = v1_params();
    assert_eq!(
        string_to_sign(BASE_URL, &params_suffix(&params)),
        "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675309Digits1234From+14158675309To+18005551212"
    );
    assert_eq!(
        compute_signature(TOKEN, BASE_URL, &params),
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    );
    assert!(verify_form(
        TOKEN,
        BASE_URL,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
}

#[test]
fn v2_https_with_port_443() {
    let params = v1_params();
    let url_443 = "https://mycompany.com:443/myapp.php?foo=1&bar=2";
    assert_eq!(
        compute_signature(TOKEN, url_443, &params),
        "kvajT1Ptam85bY51eRf/AJRuM3w="
    );
    // Signed with :443, received without: add_port.
    assert!(verify_form(
        TOKEN,
        BASE_URL,
        &params,
        "kvajT1Ptam85bY51eRf/AJRuM3w="
    ));
    // Signed without, received with :443: remove_port.
    assert!(verify_form(
        TOKEN,
        url_443,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
    assert!(verify_form(
        TOKEN,
        url_443,
        &params,
        "kvajT1Ptam85bY51eRf/AJRuM3w="
    ));
}

#[test]
fn v3_http_with_port_80() {
    let params = v1_params();
    let url_80 = "http://mycompany.com:80/myapp.php?foo=1&bar=2";
    let url_plain = "http://mycompany.com/myapp.php?foo=1&bar=2";
    assert_eq!(
        compute_signature(TOKEN, url_80, &params),
        "0ZXoZLH/DfblKGATFgpif+LLRf4="
    );
    assert!(verify_form(
        TOKEN,
        url_plain,
        &params,
        "0ZXoZLH/DfblKGATFgpif+LLRf4="
    ));
    assert!(verify_form(
        TOKEN,
        url_80,
        &params,
        "0ZXoZLH/DfblKGATFgpif+LLRf4="
    ));
    // The https signature is not valid for an http URL.
    assert!(!verify_form(
        TOKEN,
        url_plain,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
}

#[test]
fn v4_http_with_port_1234() {
    let params = v1_params();
    let url_1234 = "http://mycompany.com:1234/myapp.php?foo=1&bar=2";
    assert_eq!(
        compute_signature(TOKEN, url_1234, &params),
        "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    );
    assert!(verify_form(
        TOKEN,
        url_1234,
        &params,
        "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    ));
    // twilio-python test_validation_removes_port_on_https: a non-default port is removed too.
    assert!(verify_form(
        TOKEN,
        "https://mycompany.com:1234/myapp.php?foo=1&bar=2",
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
    // But a port is never swapped for another one.
    assert!(!verify_form(
        TOKEN,
        "http://mycompany.com:1235/myapp.php?foo=1&bar=2",
        &params,
        "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
    ));
}

#[test]
fn v5_repeated_keys_sorted_and_deduplicated() {
    let params = p(&[
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
    ]);
    assert_eq!(
        string_to_sign(BASE_URL, &params_suffix(&params)),
        "https://mycompany.com/myapp.php?foo=1&bar=2Digits1234Digits5678SidCA123SidAccountAC123"
    );
    assert_eq!(
        compute_signature(TOKEN, BASE_URL, &params),
        "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    );
    let with_duplicate = p(&[
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
        ("Digits", "1234"),
    ]);
    assert_eq!(
        compute_signature(TOKEN, BASE_URL, &with_duplicate),
        "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    );
    assert!(verify_form(
        TOKEN,
        BASE_URL,
        &with_duplicate,
        "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    ));
}

#[test]
fn neg_vector_is_what_skipping_dedup_would_give() {
    // The "neg" vector: Digits=[5678,1234,1234] signed without de-duplication.
    let not_deduplicated = "https://mycompany.com/myapp.php?foo=1&bar=2Digits1234Digits1234Digits5678SidCA123SidAccountAC123";
    assert_eq!(
        sign_sha1(TOKEN, not_deduplicated).as_deref(),
        Some("tM//N+MVWOh7+ol2z8YCNxSY0Eg=")
    );
    let with_duplicate = p(&[
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
        ("Digits", "1234"),
    ]);
    assert_ne!(
        compute_signature(TOKEN, BASE_URL, &with_duplicate),
        "tM//N+MVWOh7+ol2z8YCNxSY0Eg="
    );
    assert!(!verify_form(
        TOKEN,
        BASE_URL,
        &with_duplicate,
        "tM//N+MVWOh7+ol2z8YCNxSY0Eg="
    ));
}

#[test]
fn v6_json_body() {
    let body = br#"{"property": "value", "boolean": true}"#;
    let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
    assert_eq!(hex::encode(Sha256::digest(body)), hash);
    let url = format!("{BASE_URL}&bodySHA256={hash}");
    let signature = "a9nBmqA0ju/hNViExpshrM61xv4=";
    assert_eq!(compute_signature(TOKEN, &url, &[]), signature);
    assert!(verify_json(TOKEN, &url, body, signature));
    // Port leniency applies here too.
    let url_443 = format!("https://mycompany.com:443/myapp.php?foo=1&bar=2&bodySHA256={hash}");
    assert!(verify_json(TOKEN, &url_443, body, signature));
    // Tampered body, wrong signature, missing or uppercase hash: rejected.
    assert!(!verify_json(
        TOKEN,
        &url,
        br#"{"property": "value", "boolean": false}"#,
        signature
    ));
    assert!(!verify_json(
        TOKEN,
        &url,
        body,
        "a9nBmqA0ju/hNViExpshrM61xv5="
    ));
    assert!(!verify_json(
        TOKEN,
        BASE_URL,
        body,
        "zYQTYrRWXE7LtzbG4PfP7/bkkGo="
    ));
    let upper = format!("{BASE_URL}&bodySHA256={}", hash.to_uppercase());
    let upper_sig = compute_signature(TOKEN, &upper, &[]);
    assert!(!verify_json(TOKEN, &upper, body, &upper_sig));
}

#[test]
fn v6b_empty_json_body() {
    let hash = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    assert_eq!(hex::encode(Sha256::digest(b"{}")), hash);
    let url = format!("{BASE_URL}&bodySHA256={hash}");
    // signature_vectors.json lists Ldidvp.. for the URL without a port, but that is the
    // signature of the `:443` form (twilio-python 9.13.0 computes rw/jVvi.. for the URL as
    // listed, and its `validate` accepts Ldidvp.. only through `add_port`).
    let url_443 = format!("https://mycompany.com:443/myapp.php?foo=1&bar=2&bodySHA256={hash}");
    assert_eq!(
        compute_signature(TOKEN, &url, &[]),
        "rw/jVviOgicj2+kHZULvebnA4ag="
    );
    assert_eq!(
        compute_signature(TOKEN, &url_443, &[]),
        "Ldidvp12m26NI7eqEvxnEpkd9Hc="
    );
    for signature in [
        "Ldidvp12m26NI7eqEvxnEpkd9Hc=",
        "rw/jVviOgicj2+kHZULvebnA4ag=",
    ] {
        assert!(verify_json(TOKEN, &url, b"{}", signature));
        assert!(verify_json(TOKEN, &url_443, b"{}", signature));
        assert!(!verify_json(TOKEN, &url, b"{ }", signature));
    }
}

#[test]
fn body_sha256_is_read_like_parse_qs() {
    let hash = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    // First non-empty value wins; names and values are %-decoded; the fragment is not query.
    let cases = [
        (format!("https://h/x?bodySHA256=&bodySHA256={hash}"), true),
        (format!("https://h/x?bodySHA256={hash}&bodySHA256=00"), true),
        (
            format!("https://h/x?bodySHA256=00&bodySHA256={hash}"),
            false,
        ),
        (format!("https://h/x?body%53HA256={hash}"), true),
        (format!("https://h/x?bodySHA256=%34{}", &hash[1..]), true),
        (format!("https://h/x#bodySHA256={hash}"), false),
        (format!("https://h/x?a=1#&bodySHA256={hash}"), false),
        (format!("https://h/x?bodysha256={hash}"), false),
        (format!("https://h/x?bodySHA256={hash}&"), true),
    ];
    for (url, expected) in cases {
        let signature = compute_signature(TOKEN, &url, &[]);
        assert_eq!(
            verify_json(TOKEN, &url, b"{}", &signature),
            expected,
            "{url}"
        );
    }
}

#[test]
fn v7_docs_worked_example() {
    let params = p(&[
        ("Digits", "1234"),
        ("To", "+18005551212"),
        ("From", "+14158675310"),
        ("Caller", "+14158675310"),
        ("CallSid", "CA1234567890ABCDE"),
    ]);
    let url = "https://example.com/myapp.php?foo=1&bar=2";
    assert_eq!(
        string_to_sign(url, &params_suffix(&params)),
        "https://example.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675310Digits1234From+14158675310To+18005551212"
    );
    assert_eq!(
        compute_signature(TOKEN, url, &params),
        "L/OH5YylLD5NRKLltdqwSvS0BnU="
    );
}

#[test]
fn v8_whatsapp_inbound_and_variants() {
    let params = v8_params(Some("Hello, agent! ¿Qué tal? 👋"));
    assert_eq!(
        string_to_sign(V8_URL, &params_suffix(&params)),
        "https://gateway.example.com/twilio/whatsapp/inboundAccountSidAC00000000000000000000000000000000ApiVersion2010-04-01BodyHello, agent! ¿Qué tal? 👋Fromwhatsapp:+14155550100MessageSidSM0123456789abcdef0123456789abcdefMessageTypetextNumMedia0NumSegments1ProfileNameAliceReferralNumMedia0SmsMessageSidSM0123456789abcdef0123456789abcdefSmsSidSM0123456789abcdef0123456789abcdefSmsStatusreceivedTowhatsapp:+14155238886WaId14155550100"
    );
    assert_eq!(
        compute_signature(V8_TOKEN, V8_URL, &params),
        "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
    );
    assert!(verify_form(
        V8_TOKEN,
        V8_URL,
        &params,
        "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
    ));
    let url_443 = "https://gateway.example.com:443/twilio/whatsapp/inbound";
    assert_eq!(
        compute_signature(V8_TOKEN, url_443, &params),
        "M9UaJaXCUnQ3K+ZsTNQ6Nw5LIdg="
    );
    assert!(verify_form(
        V8_TOKEN,
        V8_URL,
        &params,
        "M9UaJaXCUnQ3K+ZsTNQ6Nw5LIdg="
    ));
    // Empty Body is signed as "Body"; an absent Body is not signed at all.
    let empty_body = v8_params(Some(""));
    assert_eq!(
        compute_signature(V8_TOKEN, V8_URL, &empty_body),
        "0kw9PVnigKtIuZ8w5PgK777eZc0="
    );
    let no_body = v8_params(None);
    assert_eq!(
        compute_signature(V8_TOKEN, V8_URL, &no_body),
        "kavQhnpvPpZ/wgiaBxfUKezE7TU="
    );
    assert!(!verify_form(
        V8_TOKEN,
        V8_URL,
        &no_body,
        "0kw9PVnigKtIuZ8w5PgK777eZc0="
    ));
    // Case matters in the token; a trailing slash changes the URL.
    assert!(!verify_form(
        b"0123456789ABCDEF0123456789abcdef",
        V8_URL,
        &params,
        "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
    ));
    assert!(!verify_form(
        V8_TOKEN,
        "https://gateway.example.com/twilio/whatsapp/inbound/",
        &params,
        "efQ0l4r/RUNpC2xpEdlcy+8gwpM="
    ));
    // The header value is compared as is (no trimming), like the SDK.
    assert!(!verify_form(
        V8_TOKEN,
        V8_URL,
        &params,
        "efQ0l4r/RUNpC2xpEdlcy+8gwpM= "
    ));
}

#[test]
fn v9_status_callback() {
    let params = p(&[
        ("MessageSid", "SM0123456789abcdef0123456789abcdef"),
        ("MessageStatus", "delivered"),
        ("SmsSid", "SM0123456789abcdef0123456789abcdef"),
        ("SmsStatus", "delivered"),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", "whatsapp:+14155238886"),
        ("To", "whatsapp:+14155550100"),
        ("ApiVersion", "2010-04-01"),
        ("ChannelToAddress", "+1415555XXXX"),
        ("ChannelPrefix", "whatsapp"),
        ("ChannelInstallSid", "XE00000000000000000000000000000000"),
        ("StructuredMessage", "false"),
    ]);
    let url = "https://gateway.example.com/twilio/status?tenant=a";
    assert_eq!(
        compute_signature(V8_TOKEN, url, &params),
        "M57oGqG9Y2g0cg5Rem1+naJT8fQ="
    );
    assert!(verify_form(
        V8_TOKEN,
        url,
        &params,
        "M57oGqG9Y2g0cg5Rem1+naJT8fQ="
    ));
}

#[test]
fn v10_query_string_is_signed_verbatim() {
    let params = v1_params();
    let encoded = "https://mycompany.com/myapp.php?foo=1&bar=2&Body=It%27s+amazing";
    let raw = "https://mycompany.com/myapp.php?foo=1&bar=2&Body=It's+amazing";
    assert_eq!(
        compute_signature(TOKEN, encoded, &params),
        "TfZzewPq8wqrGlMfyAud8+/IvJ0="
    );
    assert_eq!(
        compute_signature(TOKEN, raw, &params),
        "dsq4Ehbj6cs+KdTkpF5sSSplOWw="
    );
    assert!(verify_form(
        TOKEN,
        encoded,
        &params,
        "TfZzewPq8wqrGlMfyAud8+/IvJ0="
    ));
    assert!(verify_form(
        TOKEN,
        raw,
        &params,
        "dsq4Ehbj6cs+KdTkpF5sSSplOWw="
    ));
    assert!(!verify_form(
        TOKEN,
        raw,
        &params,
        "TfZzewPq8wqrGlMfyAud8+/IvJ0="
    ));
}

#[test]
fn v11_userinfo_is_signed_when_present() {
    let params = v1_params();
    let url = "https://user:pass@mycompany.com/myapp.php?foo=1&bar=2";
    assert_eq!(
        compute_signature(TOKEN, url, &params),
        "CukzLTc1tT5dXEDIHm/tKBanW10="
    );
    assert!(verify_form(
        TOKEN,
        url,
        &params,
        "CukzLTc1tT5dXEDIHm/tKBanW10="
    ));
    // Userinfo is not stripped: callers pass the URL without it.
    assert!(!verify_form(
        TOKEN,
        url,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    ));
}

#[test]
fn v12_shared_key_hmac_sha256() {
    assert_eq!(
        compute_signature_sha256(TOKEN, BASE_URL, &v1_params()),
        "033hgUJA9M/hXIZsYjwkerEP/DBm35nEri5FhCYjA5s="
    );
}

#[test]
fn v13_no_params() {
    assert_eq!(
        compute_signature(TOKEN, BASE_URL, &[]),
        "zYQTYrRWXE7LtzbG4PfP7/bkkGo="
    );
    assert!(verify_form(
        TOKEN,
        BASE_URL,
        &[],
        "zYQTYrRWXE7LtzbG4PfP7/bkkGo="
    ));
}

#[test]
fn wrong_inputs_are_rejected() {
    let params = v1_params();
    let good = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
    assert!(!verify_form(b"12346", BASE_URL, &params, good));
    assert!(!verify_form(b"", BASE_URL, &params, good));
    assert!(!verify_form(TOKEN, BASE_URL, &params, ""));
    assert!(!verify_form(
        TOKEN,
        BASE_URL,
        &params,
        "RSOYDt4T1cUTdK1PDd93/VVr8B8"
    ));
    assert!(!verify_form(TOKEN, BASE_URL, &params[1..], good));
    let mut extra = params.clone();
    extra.push(("Body".to_owned(), String::new()));
    assert!(!verify_form(TOKEN, BASE_URL, &extra, good));
    let mut changed = params.clone();
    changed[1].1 = "1235".to_owned();
    assert!(!verify_form(TOKEN, BASE_URL, &changed, good));
    assert!(!verify_form(
        TOKEN,
        "http://mycompany.com/myapp.php?foo=1&bar=2",
        &params,
        good
    ));
}

#[test]
fn port_candidates() {
    let cases: &[(&str, &[&str])] = &[
        ("https://h/x", &["https://h/x", "https://h:443/x"]),
        ("http://h/x", &["http://h/x", "http://h:80/x"]),
        ("https://h:443/x", &["https://h:443/x", "https://h/x"]),
        (
            "https://h:8443/x?a=b:c",
            &["https://h:8443/x?a=b:c", "https://h/x?a=b:c"],
        ),
        ("http://h:443/x", &["http://h:443/x", "http://h/x"]),
        ("https://h", &["https://h", "https://h:443"]),
        ("https://h:443", &["https://h:443", "https://h"]),
        ("https://h?q=1", &["https://h?q=1", "https://h:443?q=1"]),
        ("https://h#f", &["https://h#f", "https://h:443#f"]),
        ("HTTPS://h/x", &["HTTPS://h/x", "HTTPS://h:443/x"]),
        ("ftp://h/x", &["ftp://h/x", "ftp://h:80/x"]),
        ("wss://h/x", &["wss://h/x", "wss://h:80/x"]),
        ("https://h:0443/x", &["https://h:0443/x", "https://h/x"]),
        ("https://h:0/x", &["https://h:0/x", "https://h/x"]),
        (
            "https://h:/x",
            &["https://h:/x", "https://h/x", "https://h:443/x"],
        ),
        (
            "https://user:pw@h:8443/x",
            &["https://user:pw@h:8443/x", "https://user:pw@h/x"],
        ),
        (
            "https://user:pw@h/x",
            &["https://user:pw@h/x", "https://user:pw@h:443/x"],
        ),
        (
            "https://a@b:pw@h:81/x",
            &["https://a@b:pw@h:81/x", "https://a@b:pw@h/x"],
        ),
        (
            "https://[::1]:8443/x",
            &["https://[::1]:8443/x", "https://[::1]/x"],
        ),
        (
            "https://[2001:db8::1]/x",
            &["https://[2001:db8::1]/x", "https://[2001:db8::1]:443/x"],
        ),
        (
            "https://bücher.example:8443/ü",
            &["https://bücher.example:8443/ü", "https://bücher.example/ü"],
        ),
        // Unparseable authorities: only the URL as given.
        ("https://h:65536/x", &["https://h:65536/x"]),
        (
            "https://h:99999999999999999999/x",
            &["https://h:99999999999999999999/x"],
        ),
        ("https://h:8a/x", &["https://h:8a/x"]),
        ("https://h:+80/x", &["https://h:+80/x"]),
        ("https://h:1:2/x", &["https://h:1:2/x"]),
        ("https://::1/x", &["https://::1/x"]),
        ("https://[::1/x", &["https://[::1/x"]),
        ("https://[::1]x/x", &["https://[::1]x/x"]),
        ("https://h]/x", &["https://h]/x"]),
        ("https://h:١٢/x", &["https://h:١٢/x"]),
        ("https:/h/x", &["https:/h/x"]),
        ("//h:80/x", &["//h:80/x"]),
        ("1https://h/x", &["1https://h/x"]),
        ("", &[""]),
        ("not a url", &["not a url"]),
    ];
    for (url, expected) in cases {
        assert_eq!(candidates(url), *expected, "{url}");
    }
}

#[test]
fn garbage_does_not_panic() {
    let urls = [
        "",
        ":",
        "://",
        "https://",
        "https://@",
        "https://[",
        "https://]",
        "https://[]",
        "https://[]:",
        "https://:",
        "https://:80",
        "https://@:/?#",
        "h://\u{0}:\u{0}",
        "https://é:é/é",
        "https://👋:1/👋",
        "https://a@👋@[👋]:443",
        "%",
        "https://h/x?bodySHA256=%",
        "https://h/x?bodySHA256=%f",
        "https://h/x?bodySHA256=%zz&=&&=x&bodySHA256",
        "\u{10FFFF}://\u{10FFFF}",
    ];
    for url in urls {
        let _ = candidates(url);
        let signature = compute_signature(b"", url, &[]);
        assert!(verify_form(b"", url, &[], &signature), "{url:?}");
        let _ = verify_json(b"", url, b"", &signature);
        let _ = verify_json(b"", url, &[0xff, 0xfe], "\u{0}");
    }
}

#[test]
fn param_order_is_bytewise_and_values_sort_within_a_key() {
    // Uppercase sorts before lowercase; U+FFFD (BMP) before U+1F44B (astral), unlike UTF-16.
    let params = p(&[
        ("b", "2"),
        ("a", "z"),
        ("B", "1"),
        ("\u{1F44B}", "x"),
        ("\u{FFFD}", "y"),
        ("a", ""),
        ("a", "\u{1F44B}"),
        ("a", "\u{FFFD}"),
    ]);
    assert_eq!(
        params_suffix(&params),
        "B1a".to_owned() + "az" + "a\u{FFFD}" + "a\u{1F44B}" + "b2" + "\u{FFFD}y" + "\u{1F44B}x"
    );
}

fn url_strategy() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("https"), Just("http"), Just("HTTPS"), Just("wss")],
        prop_oneof![
            Just(String::new()),
            Just("user:pw@".to_owned()),
            Just("u@".to_owned())
        ],
        prop_oneof![
            Just("mycompany.com".to_owned()),
            Just("[::1]".to_owned()),
            Just("bücher.example".to_owned()),
            "[a-z0-9.-]{1,12}"
        ],
        prop_oneof![
            Just(String::new()),
            Just(":".to_owned()),
            (0u32..70_000).prop_map(|port| format!(":{port}"))
        ],
        prop_oneof![Just(String::new()), "/[^?#]{0,16}"],
        prop_oneof![Just(String::new()), "\\?[^#]{0,16}"],
    )
        .prop_map(|(scheme, userinfo, host, port, path, query)| {
            format!("{scheme}://{userinfo}{host}{port}{path}{query}")
        })
}

fn params_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (
            prop_oneof!["[A-Za-z]{1,3}", "\\PC{0,4}", Just("Body".to_owned())],
            prop_oneof![Just(String::new()), "\\PC{0,8}", ".{0,8}"],
        ),
        0..8,
    )
}

proptest! {
    #[test]
    fn computed_signature_verifies(
        token in prop::collection::vec(any::<u8>(), 0..40),
        url in url_strategy(),
        params in params_strategy(),
    ) {
        let signature = compute_signature(&token, &url, &params);
        prop_assert!(verify_form(&token, &url, &params, &signature));
        // Param order does not matter.
        let mut reversed = params.clone();
        reversed.reverse();
        prop_assert!(verify_form(&token, &url, &reversed, &signature));
        // Every port variant we accept verifies the received URL.
        for candidate in candidates(&url) {
            let signature = compute_signature(&token, &candidate, &params);
            prop_assert!(verify_form(&token, &url, &params, &signature));
        }
    }

    #[test]
    fn changing_a_param_value_breaks_the_signature(
        token in prop::collection::vec(any::<u8>(), 0..40),
        url in url_strategy(),
        params in prop::collection::btree_map("\\PC{0,6}", "\\PC{0,8}", 1..8),
        index in any::<prop::sample::Index>(),
        new_value in "\\PC{0,8}",
    ) {
        // Distinct names: with repeated names, changing one duplicate into another value the
        // name already has legitimately leaves the de-duplicated string unchanged.
        let mut params: Vec<(String, String)> = params.into_iter().collect();
        let i = index.index(params.len());
        prop_assume!(params[i].1 != new_value);
        let signature = compute_signature(&token, &url, &params);
        params[i].1 = new_value;
        prop_assert!(!verify_form(&token, &url, &params, &signature));
    }

    #[test]
    fn adding_a_param_breaks_the_signature(
        token in prop::collection::vec(any::<u8>(), 0..40),
        url in url_strategy(),
        params in params_strategy(),
        name in "\\PC{1,6}",
        value in "\\PC{0,6}",
    ) {
        prop_assume!(!params.iter().any(|(n, _)| *n == name));
        // Twilio's string-to-sign has no delimiters, so `https://host:4` with no params and
        // the port-less URL (which the SDKs also accept) plus a param named `:4` sign the
        // same string. That ambiguity is the algorithm's; no Twilio field name starts with
        // `:`.
        prop_assume!(!name.starts_with(':'));
        let signature = compute_signature(&token, &url, &params);
        let mut more = params.clone();
        more.push((name, value));
        prop_assert!(!verify_form(&token, &url, &more, &signature));
    }

    #[test]
    fn arbitrary_strings_never_panic(
        token in prop::collection::vec(any::<u8>(), 0..40),
        url in prop_oneof![any::<String>(), url_strategy(), "[a-zA-Z+.-]{0,5}:(//)?[\\[\\]:@a-z0-9%]{0,16}[/?#&=]{0,3}.{0,12}"],
        params in prop::collection::vec((any::<String>(), any::<String>()), 0..4),
        body in prop::collection::vec(any::<u8>(), 0..32),
        signature in any::<String>(),
    ) {
        let _ = compute_signature(&token, &url, &params);
        let _ = compute_signature_sha256(&token, &url, &params);
        let _ = verify_form(&token, &url, &params, &signature);
        let _ = verify_json(&token, &url, &body, &signature);
        let own = compute_signature(&token, &url, &params);
        prop_assert!(verify_form(&token, &url, &params, &own));
    }

    #[test]
    fn json_round_trip(
        token in prop::collection::vec(any::<u8>(), 0..40),
        url in url_strategy(),
        body in prop::collection::vec(any::<u8>(), 0..64),
        other in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(!url.contains('#'));
        let separator = if url.contains('?') { "&" } else { "?" };
        let url = format!("{url}{separator}bodySHA256={}", hex::encode(Sha256::digest(&body)));
        let signature = compute_signature(&token, &url, &[]);
        prop_assert!(verify_json(&token, &url, &body, &signature));
        prop_assert_eq!(verify_json(&token, &url, &other, &signature), other == body);
    }
}
