//! Small text helpers shared by the renderers: escaping for HTML/XML and Markdown table
//! cells, and human formatting of latencies, bytes, rates and times.

use squall_check::Validity;

/// Escapes text for HTML and XML content and attribute values (both quote kinds), and
/// drops the control characters XML 1.0 does not allow.
pub fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// One line of text for a Markdown table cell: pipes escaped, newlines flattened, a `<`
/// that would open an HTML tag (`<seq 5>`) escaped, at most `max` characters.
pub fn md_cell(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let cut = truncate(&flat, max);
    let mut out = String::with_capacity(cut.len() + 8);
    let mut chars = cut.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '|' => out.push_str("\\|"),
            '<' if chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || matches!(n, '/' | '!' | '?')) =>
            {
                out.push_str("&lt;")
            }
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters, with an ellipsis when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Microseconds as milliseconds: `0.42`, `12.3`, `1234`.
pub fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 1.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Bytes in binary units: `12.3 MiB`.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A rate or count with sensible precision.
pub fn num(v: f64) -> String {
    if (v == v.trunc() && v.abs() < 1e15) || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Seconds: `12.34 s`.
pub fn secs(s: f64) -> String {
    format!("{s:.2} s")
}

/// A signed offset in seconds: `+8.00 s`.
pub fn offset(s: f64) -> String {
    format!("{s:+.2} s")
}

/// `pass`, `FAIL`, `UNKNOWN`.
pub fn validity(v: Validity) -> &'static str {
    match v {
        Validity::Valid => "pass",
        Validity::Invalid => "FAIL",
        Validity::Unknown => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            escape_xml("a<b & \"c\" 'd'>\u{1}"),
            "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;"
        );
        assert_eq!(md_cell("a|b\nc", 80), "a\\|b c");
        assert_eq!(md_cell("p99 < 5ms, <seq 5>", 80), "p99 < 5ms, &lt;seq 5>");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }

    #[test]
    fn formats() {
        assert_eq!(ms(420), "0.42");
        assert_eq!(ms(12_345), "12.3");
        assert_eq!(ms(1_234_567), "1235");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(num(40.0), "40");
        assert_eq!(num(3.456), "3.46");
        assert_eq!(num(12.34), "12.3");
    }
}
