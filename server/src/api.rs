//! The OpenAI request bodies convoy understands, and how they map onto a [`convoy::Request`].
//!
//! One body type serves both endpoints (the union of their fields), so every field is parsed
//! the same way and a wrong type names its field (`serde_path_to_error`). Unknown fields are
//! ignored, as OpenAI-compatible servers do: clients send fields a server may not know.
//! Fields convoy cannot honour yet (several choices, logprobs, tools) are refused
//! with a 400 that says so, rather than silently ignored.
use convoy::{ChatMessage, Constraint, Prompt, Request, SamplingParams, StopConditions};
use serde::Deserialize;
use serde_json::Value;

/// Defaults the server applies where a request is silent (command-line options).
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub max_tokens: usize,
    pub temperature: f32,
}

#[derive(Debug, Default, Deserialize)]
pub struct Body {
    // `model` is accepted and ignored: the server serves one model (see /v1/models).
    pub messages: Option<Vec<Message>>,
    pub prompt: Option<PromptField>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; as in vLLM and llama.cpp's server.
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    /// A boolean for chat, a number for completions.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    /// Not in OpenAI's API; as in vLLM.
    pub ignore_eos: Option<bool>,
    pub tools: Option<Value>,
    pub functions: Option<Value>,
    pub response_format: Option<Value>,
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// A 400 answer: the message and the field it is about.
#[derive(Debug)]
pub struct Invalid {
    pub message: String,
    pub param: Option<String>,
}

fn invalid(message: impl Into<String>, param: &str) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

/// Parses a request body.
pub fn parse(bytes: &[u8]) -> Result<Body, Invalid> {
    // serde would also fill a struct from a JSON array, field by field.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        let message = match serde_json::from_slice::<Value>(bytes) {
            Ok(_) => "the body must be a JSON object".to_owned(),
            Err(e) => format!("the body is not valid JSON: {e}"),
        };
        return Err(Invalid {
            message,
            param: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let body: Body = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            Invalid {
                message: format!("the body is not valid JSON: {inner}"),
                param: None,
            }
        } else if path == "." {
            Invalid {
                message: format!("the body must be a JSON object: {inner}"),
                param: None,
            }
        } else {
            Invalid {
                message: format!("{path}: {inner}"),
                param: Some(path),
            }
        }
    })?;
    de.end().map_err(|e| Invalid {
        message: format!("the body is not valid JSON: {e}"),
        param: None,
    })?;
    Ok(body)
}

/// Which endpoint a body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A request as convoy will run it.
pub struct Parsed {
    pub request: Request,
    pub stream: bool,
    pub include_usage: bool,
}

impl Body {
    /// Checks the body for `kind` and builds the convoy request.
    pub fn into_request(self, kind: Kind, defaults: Defaults) -> Result<Parsed, Invalid> {
        self.refuse_unsupported(kind)?;
        let constraint = self.constraint()?;
        let prompt = match kind {
            Kind::Chat => {
                let messages = self
                    .messages
                    .as_ref()
                    .ok_or_else(|| invalid("messages is required", "messages"))?;
                if messages.is_empty() {
                    return Err(invalid("messages must not be empty", "messages"));
                }
                let mut chat = Vec::with_capacity(messages.len());
                for (i, m) in messages.iter().enumerate() {
                    chat.push(ChatMessage::new(m.role.clone(), message_text(m, i)?));
                }
                Prompt::Chat(chat)
            }
            Kind::Completion => match &self.prompt {
                None => return Err(invalid("prompt is required", "prompt")),
                Some(PromptField::Text(t)) => Prompt::Text(t.clone()),
                Some(PromptField::Tokens(ids)) => Prompt::Tokens(ids.clone()),
                Some(PromptField::Texts(v)) if v.len() == 1 => Prompt::Text(v[0].clone()),
                Some(PromptField::TokenLists(v)) if v.len() == 1 => Prompt::Tokens(v[0].clone()),
                Some(_) => {
                    return Err(invalid(
                        "one prompt per request: send several prompts as separate requests \
                         (they are batched together)",
                        "prompt",
                    ))
                }
            },
        };
        let max_tokens = match kind {
            Kind::Chat => self.max_completion_tokens.or(self.max_tokens),
            Kind::Completion => self.max_tokens,
        };
        let max_tokens = match max_tokens {
            Some(0) => return Err(invalid("max_tokens must be at least 1", "max_tokens")),
            Some(n) => n as usize,
            None => defaults.max_tokens,
        };
        let stop_strings = match self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s],
            Some(StopField::Many(v)) => v,
        };
        if stop_strings.iter().any(String::is_empty) {
            return Err(invalid("stop strings must not be empty", "stop"));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            // Negative seeds are valid in OpenAI's API: their bits are as good a seed.
            seed: self.seed.map(|s| s as u64),
            // Refused above until the server maps them (issue 13).
            logprobs: None,
        };
        let request = Request {
            prompt,
            sampling,
            stop: StopConditions {
                max_tokens,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                stop_token_ids: Vec::new(),
                stop_strings,
            },
            constraint,
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Parsed {
            request,
            stream,
            include_usage,
        })
    }

    /// `response_format` as a convoy constraint: `json_object` is any JSON object,
    /// `json_schema` its `json_schema.schema` (checked by the engine at submit).
    fn constraint(&self) -> Result<Option<Constraint>, Invalid> {
        let Some(format) = self.response_format.as_ref().filter(|f| !f.is_null()) else {
            return Ok(None);
        };
        let bad = |m: &str| invalid(m, "response_format");
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()))),
            Some("json_schema") => {
                let schema = format
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        bad("response_format.json_schema.schema must be a JSON schema")
                    })?;
                Ok(Some(Constraint::JsonSchema(schema.to_string())))
            }
            _ => Err(bad(
                "response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
            )),
        }
    }

    fn refuse_unsupported(&self, kind: Kind) -> Result<(), Invalid> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid(
                "only n = 1 is supported: send several requests (they are batched together)",
                "n",
            ));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(invalid("only best_of = 1 is supported", "best_of"));
        }
        let logprobs = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            // Completions: a number of top tokens, 0 meaning only the sampled one's.
            Some(_) => true,
        };
        if logprobs || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(invalid("logprobs are not supported yet", "logprobs"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_null())
            || self.functions.as_ref().is_some_and(|t| !t.is_null())
        {
            return Err(invalid(
                "tools and function calling are not supported",
                "tools",
            ));
        }
        if let Some(bias) = &self.logit_bias {
            if !(bias.is_null() || bias.as_object().is_some_and(|m| m.is_empty())) {
                return Err(invalid("logit_bias is not supported", "logit_bias"));
            }
        }
        if kind == Kind::Completion {
            if self.echo == Some(true) {
                return Err(invalid("echo is not supported", "echo"));
            }
            if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
                return Err(invalid("suffix is not supported", "suffix"));
            }
        }
        Ok(())
    }
}

fn message_text(m: &Message, i: usize) -> Result<String, Invalid> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    ("text", None) => {
                        return Err(invalid(
                            format!("messages[{i}]: a text part needs text"),
                            "messages",
                        ))
                    }
                    (other, _) => {
                        return Err(invalid(
                            format!("messages[{i}]: content parts of type {other:?} are not supported (text only)"),
                            "messages",
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Defaults = Defaults {
        max_tokens: 512,
        temperature: 0.0,
    };

    #[test]
    fn wrong_types_name_their_field() {
        let e = parse(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{}", e.message);
        let e = parse(br#"{"messages": [{"role": 1}]}"#).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].role"),
            "{}",
            e.message
        );
        let e = parse(br#"{"messages": [}"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse(br#"[1, 2]"#).unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = parse(br#"{} {}"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn unknown_fields_are_ignored_and_defaults_apply() {
        let b = parse(br#"{"model": "x", "prompt": "hi", "user": "u", "whatever": [1]}"#).unwrap();
        let p = b.into_request(Kind::Completion, D).unwrap();
        assert_eq!(p.request.stop.max_tokens, 512);
        assert_eq!(p.request.sampling.temperature, 0.0);
        assert!(!p.stream);
    }

    #[test]
    fn fields_map_onto_convoy() {
        let b = parse(
            br#"{"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                 {"role": "user", "content": "hi"}],
                 "max_completion_tokens": 7, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9,
                 "top_k": 4, "min_p": 0.1, "seed": -1, "stop": "x", "stream": true,
                 "stream_options": {"include_usage": true}, "presence_penalty": 0.2,
                 "frequency_penalty": 0.3, "repetition_penalty": 1.1, "ignore_eos": true,
                 "n": 1, "logprobs": false, "response_format": {"type": "text"}}"#,
        )
        .unwrap();
        let p = b.into_request(Kind::Chat, D).unwrap();
        let r = &p.request;
        assert_eq!(
            r.prompt,
            Prompt::Chat(vec![
                ChatMessage::new("system", "ab"),
                ChatMessage::new("user", "hi")
            ])
        );
        assert_eq!(r.stop.max_tokens, 7);
        assert!(r.stop.ignore_eos);
        assert_eq!(r.stop.stop_strings, vec!["x".to_string()]);
        assert_eq!(r.sampling.seed, Some(u64::MAX));
        assert_eq!(r.sampling.top_k, 4);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn response_format_becomes_a_constraint() {
        let chat = |format: &str| {
            let body = format!(
                r#"{{"messages": [{{"role": "user", "content": "a"}}], "response_format": {format}}}"#
            );
            parse(body.as_bytes())
                .unwrap()
                .into_request(Kind::Chat, D)
                .unwrap()
                .request
                .constraint
        };
        assert_eq!(chat("null"), None);
        assert_eq!(chat(r#"{"type": "text"}"#), None);
        assert_eq!(
            chat(r#"{"type": "json_object"}"#),
            Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()))
        );
        assert_eq!(
            chat(
                r#"{"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}"#
            ),
            Some(Constraint::JsonSchema(r#"{"type":"integer"}"#.into()))
        );
    }

    #[test]
    fn unsupported_fields_are_refused() {
        for (body, param) in [
            (r#"{"prompt": "a", "n": 2}"#, "n"),
            (r#"{"prompt": "a", "logprobs": 1}"#, "logprobs"),
            (r#"{"prompt": "a", "echo": true}"#, "echo"),
            (r#"{"prompt": ["a", "b"]}"#, "prompt"),
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"messages": []}"#, "messages"),
            (r#"{"prompt": "a", "stop": [""]}"#, "stop"),
        ] {
            let kind = if body.contains("messages") {
                Kind::Chat
            } else {
                Kind::Completion
            };
            let e = parse(body.as_bytes())
                .unwrap()
                .into_request(kind, D)
                .err()
                .unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        for (body, param) in [
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "logprobs": true}"#,
                "logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "tools": [{}]}"#,
                "tools",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "xml"}}"#,
                "response_format",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}"#,
                "response_format",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages",
            ),
            (r#"{"prompt": "a"}"#, "messages"),
        ] {
            let e = parse(body.as_bytes())
                .unwrap()
                .into_request(Kind::Chat, D)
                .err()
                .unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
