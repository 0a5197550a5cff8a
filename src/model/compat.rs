//! Teacher/student compatibility: distillation compares distributions token by token, so both
//! models must use the same tokenizer.

use anyhow::{bail, Result};
use serde_json::Value;

use super::Model;

/// Refuses teacher/student pairs whose tokenizers differ (vocabulary, merges or added tokens);
/// warns when their embedding matrices differ in size (padded vocabularies), in which case
/// only the shared id range is compared.
pub fn check_compatible(student: &Model, teacher: &Model) -> Result<()> {
    let (s, t) = (student.tokenizer()?, teacher.tokenizer()?);
    let parse = |tok: &crate::tokenizer::Tokenizer| -> Result<Value> {
        Ok(serde_json::from_str(&tok.inner().to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?)?)
    };
    let (sj, tj) = (parse(s)?, parse(t)?);
    for (part, what) in [("model", "vocabulary/merges"), ("added_tokens", "special tokens")] {
        if sj.get(part) != tj.get(part) {
            bail!(
                "the teacher ({}) and the student ({}) use different tokenizers ({what} differ): \
                 token-level distillation needs one shared tokenizer",
                show(teacher),
                show(student)
            );
        }
    }
    let (vs, vt) = (student.lm.info().vocab_size, teacher.lm.info().vocab_size);
    if vs != vt {
        tracing::warn!(
            "the student's embedding has {vs} rows and the teacher's {vt}: distributions are compared over the shared {} ids",
            vs.min(vt)
        );
    }
    Ok(())
}

fn show(m: &Model) -> String {
    m.source.as_deref().map_or("<in memory>".into(), |p| p.display().to_string())
}
