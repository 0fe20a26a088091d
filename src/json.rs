//! JSON text written by hand on the hot path, where serde_json's general writer costs more than
//! the value needs: strings with nothing to escape are copied as they are, the rest go through it.

/// `value` as a JSON string, as serde_json writes it.
pub fn write_str(out: &mut Vec<u8>, value: &str) {
    // A fold rather than `all`: no early exit, so the check is vectorized.
    let plain = value.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, value).is_err() {
        // Writing a string into a Vec cannot fail; keep the text valid JSON all the same.
        out.extend_from_slice(b"\"\"");
    }
}

/// `value` as a JSON number.
pub fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_numbers_come_out_as_serde_json_writes_them() {
        for text in [
            "",
            "plain-archive_1.zip~",
            "quote \" backslash \\ slash /",
            "tab \t newline \n bell \u{7} del \u{7f}",
            "é ü 漢字 🦀 \u{2028}",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, text);
            assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
        for number in [0, 7, 1_733_222_222_222, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, number);
            assert_eq!(out, serde_json::to_vec(&number).unwrap());
        }
    }
}
