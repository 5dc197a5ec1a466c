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

/// Why Samsum-format text was refused; the position names the line (JSONL, from 1) or the
/// element (a JSON array, from 0) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("invalid JSON array: {0}")]
    InvalidArray(#[source] serde_json::Error),
    #[error("line {line}: malformed JSON: {source}")]
    MalformedLine {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{at}: {problem}")]
    Record {
        at: Position,
        problem: RecordProblem,
    },
    #[error("no examples")]
    Empty,
}

/// Where in the text a record sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Position {
    #[error("line {0}")]
    Line(usize),
    #[error("element {0}")]
    Element(usize),
}

/// What is wrong with one record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` must be a string, got {got}")]
    NotAString { field: &'static str, got: String },
    #[error("example {0:?} has an empty dialogue")]
    EmptyDialogue(String),
}

/// Reads a JSON array or JSONL file (detected from the first non-blank character).
/// Every record must have non-empty `id` and `dialogue`; errors name the line or index.
pub fn load_samsum(path: &Path) -> Result<Vec<SamsumRecord>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_samsum(&text).map_err(|source| ModelError::Data {
        path: path.to_path_buf(),
        source,
    })
}

/// [`load_samsum`] on text.
pub fn parse_samsum(text: &str) -> Result<Vec<SamsumRecord>, DataError> {
    let at = |at| move |problem| DataError::Record { at, problem };
    let records = if text.trim_start().starts_with('[') {
        let values: Vec<serde_json::Value> =
            serde_json::from_str(text).map_err(DataError::InvalidArray)?;
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| record_from_value(&v).map_err(at(Position::Element(i))))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|source| DataError::MalformedLine {
                    line: i + 1,
                    source,
                })?;
            records.push(record_from_value(&value).map_err(at(Position::Line(i + 1)))?);
        }
        records
    };
    if records.is_empty() {
        return Err(DataError::Empty);
    }
    Ok(records)
}

fn record_from_value(value: &serde_json::Value) -> Result<SamsumRecord, RecordProblem> {
    let field = |name: &'static str| -> Result<String, RecordProblem> {
        match value.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            // HF exports ids as strings, but numeric ids are common in hand-made files.
            Some(serde_json::Value::Number(n)) if name == "id" => Ok(n.to_string()),
            Some(serde_json::Value::Null) | None => Err(RecordProblem::MissingField(name)),
            Some(other) => Err(RecordProblem::NotAString {
                field: name,
                got: other.to_string(),
            }),
        }
    };
    let record = SamsumRecord {
        id: field("id")?,
        dialogue: field("dialogue")?,
        summary: field("summary")?,
    };
    if record.dialogue.trim().is_empty() {
        return Err(RecordProblem::EmptyDialogue(record.id));
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
        assert!(
            matches!(
                err,
                DataError::Record {
                    at: Position::Line(1),
                    problem: RecordProblem::MissingField("summary")
                }
            ),
            "{err}"
        );
        assert_eq!(err.to_string(), "line 1: missing field `summary`");
        let err = parse_samsum("{\"id\":\"a\"\n").expect_err("malformed");
        assert!(
            matches!(err, DataError::MalformedLine { line: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("malformed JSON"), "{err}");
        let err = parse_samsum("{\"id\":\"a\",\"dialogue\":\"  \",\"summary\":\"s\"}")
            .expect_err("empty dialogue");
        assert_eq!(
            err.to_string(),
            "line 1: example \"a\" has an empty dialogue"
        );
        let err = parse_samsum("").expect_err("empty file");
        assert!(matches!(err, DataError::Empty), "{err}");
        let err =
            parse_samsum("{\"id\":\"a\",\"dialogue\":3,\"summary\":\"s\"}").expect_err("type");
        assert_eq!(
            err.to_string(),
            "line 1: field `dialogue` must be a string, got 3"
        );
        let err = parse_samsum("[{\"id\":\"a\",\"dialogue\":\"x\",\"summary\":\"s\"}, {\"id\":1}]")
            .expect_err("array element");
        assert_eq!(err.to_string(), "element 1: missing field `dialogue`");
        let err = parse_samsum("[{\"id\":").expect_err("bad array");
        assert!(matches!(err, DataError::InvalidArray(_)), "{err}");
    }
}
