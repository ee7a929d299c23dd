//! The numerics guard of the training loops: a non-finite loss or gradient norm stops the run at
//! that step, before its log line or any checkpoint is written, so a NaN can never reach a saved
//! weight. (The optimizer already skips an update whose gradient norm is not finite; without
//! this guard the run would go on silently with a loss of NaN.)

use crate::user_err;
use anyhow::Result;

/// Test-only knob: `SAGE_TEST_NONFINITE_STEP=<n>` makes optimizer step `n` (1-based) non-finite
/// (the step's loss reads NaN), so the tests can drive the guard through the real CLI. Never set
/// it otherwise.
pub const TEST_NONFINITE_STEP_ENV: &str = "SAGE_TEST_NONFINITE_STEP";

/// Whether the test knob poisons optimizer step `step` (1-based).
pub fn test_poisons(step: u64) -> bool {
    std::env::var(TEST_NONFINITE_STEP_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()) == Some(step)
}

/// Refuses step `step` (1-based) when its loss or gradient norm is not finite. `saved`: the step
/// of the last checkpoint in the run folder, if any, which stays as it is.
pub fn check_step(step: u64, loss: f32, grad_norm: f32, saved: Option<u64>) -> Result<()> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(());
    }
    let kept = match saved {
        Some(s) => format!("the checkpoint of step {s} is intact (continue from it with --resume after the fix)"),
        None => "no checkpoint was written".into(),
    };
    Err(user_err!(
        "training stopped at step {step}: loss {loss}, gradient norm {grad_norm} (not finite). Nothing of this step \
         was written; {kept}. Lower train.lr, raise train.warmup_steps or set train.max_grad_norm, and check this \
         step's data"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_loss_or_norm_is_refused_naming_the_step() {
        assert!(check_step(3, 1.5, 0.2, None).is_ok());
        for (loss, norm) in [(f32::NAN, 0.1), (1.0, f32::INFINITY), (f32::NEG_INFINITY, 1.0)] {
            let e = check_step(7, loss, norm, Some(6)).unwrap_err();
            let s = format!("{e:#}");
            assert!(crate::error::is_user_error(&e));
            assert!(s.contains("step 7") && s.contains("checkpoint of step 6 is intact"), "{s}");
        }
    }
}
