//! Samsum-format data: the HF datasets JSON export (a JSON array) and JSONL, with fields
//! `id`, `dialogue`, `summary`.
//!
//! Owns: reading and checking examples. Must not tokenize or touch tensors.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// One dialogue-summarization example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamsumRecord {
    pub id: String,
    pub dialogue: String,
    pub summary: String,
}

/// Reads a JSON array or JSONL file (detected from the first non-blank character).
/// Every record must have non-empty `id` and `dialogue`; errors name the line or index.
pub fn load_samsum(path: &Path) -> Result<Vec<SamsumRecord>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_samsum(&text).map_err(|reason| ModelError::Data {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`load_samsum`] on text; `Err` is a message naming the line or index at fault.
pub fn parse_samsum(text: &str) -> Result<Vec<SamsumRecord>, String> {
    let records = if text.trim_start().starts_with('[') {
        let values: Vec<serde_json::Value> =
            serde_json::from_str(text).map_err(|err| format!("invalid JSON array: {err}"))?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| record_from_value(v).map_err(|e| format!("element {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|err| format!("line {}: malformed JSON: {err}", i + 1))?;
            records.push(record_from_value(value).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        records
    };
    if records.is_empty() {
        return Err("no examples".into());
    }
    Ok(records)
}

fn record_from_value(value: serde_json::Value) -> Result<SamsumRecord, String> {
    let field = |name: &str| -> Result<String, String> {
        match value.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            // HF exports ids as strings, but numeric ids are common in hand-made files.
            Some(serde_json::Value::Number(n)) if name == "id" => Ok(n.to_string()),
            Some(serde_json::Value::Null) | None => Err(format!("missing field `{name}`")),
            Some(other) => Err(format!("field `{name}` must be a string, got {other}")),
        }
    };
    let record = SamsumRecord {
        id: field("id")?,
        dialogue: field("dialogue")?,
        summary: field("summary")?,
    };
    if record.dialogue.trim().is_empty() {
        return Err(format!("example {:?} has an empty dialogue", record.id));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jsonl_and_json_array() {
        let jsonl = "{\"id\":\"a\",\"dialogue\":\"A: hi\",\"summary\":\"A greets.\"}\n\n{\"id\":7,\"dialogue\":\"B: yo\",\"summary\":\"\"}\n";
        let recs = parse_samsum(jsonl).expect("jsonl");
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].id, "7");
        let array = "[{\"id\":\"a\",\"dialogue\":\"A: hi\",\"summary\":\"s\"}]";
        assert_eq!(parse_samsum(array).expect("array").len(), 1);
    }

    #[test]
    fn bad_input_names_the_problem() {
        let err = parse_samsum("{\"id\":\"a\",\"dialogue\":\"x\"}").expect_err("missing");
        assert!(err.contains("line 1") && err.contains("summary"), "{err}");
        let err = parse_samsum("{\"id\":\"a\"\n").expect_err("malformed");
        assert!(err.contains("malformed JSON"), "{err}");
        let err = parse_samsum("{\"id\":\"a\",\"dialogue\":\"  \",\"summary\":\"s\"}")
            .expect_err("empty dialogue");
        assert!(err.contains("empty dialogue"), "{err}");
        let err = parse_samsum("").expect_err("empty file");
        assert!(err.contains("no examples"), "{err}");
        let err =
            parse_samsum("{\"id\":\"a\",\"dialogue\":3,\"summary\":\"s\"}").expect_err("type");
        assert!(err.contains("must be a string"), "{err}");
    }
}
