//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and
//! top-p (applied in that order, as transformers' logits warpers do). A seeded sampler
//! draws the same tokens on every run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::ModelError;
use super::ops::argmax;

/// How to choose tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax, ties to the lower id).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`
    /// (`None` or `1.0`: all).
    pub top_p: Option<f32>,
    /// Seed of the random generator.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }

    /// Whether these parameters choose the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }

    /// Checks every parameter is in range.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Sampling {
                name: "temperature",
                reason: format!("must be finite and >= 0, got {}", self.temperature),
            });
        }
        if self.top_k == Some(0) {
            return Err(ModelError::Sampling { name: "top_k", reason: "must be at least 1".into() });
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ModelError::Sampling { name: "top_p", reason: format!("must be in (0, 1], got {p}") });
        }
        Ok(())
    }
}

/// A token chooser with its own random state.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `params` (validated), seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        params.validate()?;
        Ok(Sampler { params, rng: ChaCha8Rng::seed_from_u64(params.seed) })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits [vocab]`. NaN logits are never chosen.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() || logits.len() < 2 {
            return argmax(logits) as u32;
        }
        let inv_t = 1.0 / self.params.temperature;
        // Candidates in descending logit order, ties to the lower id.
        let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect();
        if order.is_empty() {
            return 0;
        }
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if let Some(k) = self.params.top_k.filter(|&k| k < order.len()) {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let max = f64::from(logits[order[0] as usize]) * f64::from(inv_t);
        let mut probs: Vec<f64> =
            order.iter().map(|&i| (f64::from(logits[i as usize]) * f64::from(inv_t) - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        if let Some(p) = self.params.top_p.filter(|&p| p < 1.0) {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                cumulative += q / total;
                if cumulative >= f64::from(p) {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (&id, &q) in order.iter().zip(&probs) {
            if u < q {
                return id;
            }
            u -= q;
        }
        order[order.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn seeded_runs_repeat_and_respect_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams { temperature: 1.5, top_k: Some(5), top_p: None, seed: 7 };
        let draw = || {
            let mut s = Sampler::new(params).unwrap();
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let (a, b) = (draw(), draw());
        assert_eq!(a, b);
        let mut top: Vec<u32> = (0..50).collect();
        top.sort_by(|x, y| logits[*y as usize].total_cmp(&logits[*x as usize]));
        assert!(a.iter().all(|id| top[..5].contains(id)));
        // More than one distinct token is drawn at temperature 1.5.
        assert!(a.iter().any(|id| *id != a[0]));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.87, 0.12, 0.005, ...]: p = 0.5 keeps only the first.
        let logits = [5.0, 3.0, 0.0, -1.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: Some(0.5), seed: 1 }).unwrap();
        assert!((0..100).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        let bad = [
            SamplingParams { temperature: -1.0, ..SamplingParams::greedy() },
            SamplingParams { temperature: f32::NAN, ..SamplingParams::greedy() },
            SamplingParams { top_k: Some(0), ..SamplingParams::greedy() },
            SamplingParams { top_p: Some(0.0), ..SamplingParams::greedy() },
            SamplingParams { top_p: Some(1.5), ..SamplingParams::greedy() },
        ];
        for p in bad {
            assert!(Sampler::new(p).is_err(), "{p:?}");
        }
    }
}
