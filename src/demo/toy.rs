//! The paper's Figure 2 toy: a two-component Gaussian mixture p fitted by one Gaussian q, once
//! by minimising the forward KL(p‖q) and once the reverse KL(q‖p).
//!
//! Forward KL has a closed-form minimiser (q matches p's mean and variance) and spreads q over
//! both modes, putting mass where p has none. Reverse KL has no closed form; it is minimised
//! numerically on a grid (a coarse search over (μ, log σ), then pattern-search refinement)
//! and settles on the larger mode.

/// One Gaussian component: weight, mean, standard deviation.
pub type Component = (f64, f64, f64);

/// The mixture of the demo plot: two modes of unequal weight on [0, 10].
pub const MIXTURE: [Component; 2] = [(0.4, 2.5, 0.8), (0.6, 7.0, 0.9)];

/// The fitted Gaussians and the divergences they reach.
#[derive(Clone, Debug)]
pub struct ToyFit {
    /// (μ, σ) minimising KL(p‖q).
    pub forward: (f64, f64),
    /// (μ, σ) minimising KL(q‖p).
    pub reverse: (f64, f64),
    /// KL(p‖q) at the forward fit.
    pub forward_kl: f64,
    /// KL(q‖p) at the reverse fit.
    pub reverse_kl: f64,
}

/// The normal density.
pub fn normal_pdf(x: f64, mu: f64, sigma: f64) -> f64 {
    let z = (x - mu) / sigma;
    (-0.5 * z * z).exp() / (sigma * (2.0 * std::f64::consts::PI).sqrt())
}

/// The mixture density.
pub fn mixture_pdf(mixture: &[Component], x: f64) -> f64 {
    mixture.iter().map(|&(w, m, s)| w * normal_pdf(x, m, s)).sum()
}

/// Integration grid: wide enough to hold every density here.
fn grid() -> impl Iterator<Item = f64> {
    const LO: f64 = -10.0;
    const HI: f64 = 20.0;
    const N: usize = 6000;
    (0..N).map(|i| LO + (HI - LO) * (i as f64 + 0.5) / N as f64)
}

const DX: f64 = 30.0 / 6000.0;

/// KL(a‖b) by midpoint integration, skipping points where a underflows.
fn kl(a: impl Fn(f64) -> f64, b: impl Fn(f64) -> f64) -> f64 {
    grid()
        .map(|x| {
            let (pa, pb) = (a(x), b(x));
            if pa < 1e-300 {
                0.0
            } else {
                pa * (pa.ln() - pb.max(1e-300).ln()) * DX
            }
        })
        .sum()
}

/// Fits one Gaussian to `mixture` under both divergences.
pub fn fit(mixture: &[Component]) -> ToyFit {
    let p = |x: f64| mixture_pdf(mixture, x);
    let mean: f64 = mixture.iter().map(|&(w, m, _)| w * m).sum();
    let second: f64 = mixture.iter().map(|&(w, m, s)| w * (s * s + m * m)).sum();
    let forward = (mean, (second - mean * mean).sqrt());
    let rkl = |mu: f64, sigma: f64| kl(|x| normal_pdf(x, mu, sigma), p);
    // Coarse search, then pattern search (halve the step when no neighbour improves).
    let mut best = (f64::INFINITY, 0.0, 0.0);
    for i in 0..=40 {
        for j in 0..=12 {
            let (mu, log_s) = (i as f64 * 0.25, -1.5 + j as f64 * 0.25);
            let v = rkl(mu, log_s.exp());
            if v < best.0 {
                best = (v, mu, log_s);
            }
        }
    }
    let mut step = 0.125;
    while step > 1e-5 {
        let (v0, mu, ls) = best;
        let mut improved = false;
        for (dm, ds) in [(step, 0.0), (-step, 0.0), (0.0, step), (0.0, -step)] {
            let v = rkl(mu + dm, (ls + ds).exp());
            if v < v0 - 1e-14 && v < best.0 {
                best = (v, mu + dm, ls + ds);
                improved = true;
            }
        }
        if !improved {
            step /= 2.0;
        }
    }
    let reverse = (best.1, best.2.exp());
    ToyFit { forward, reverse, forward_kl: kl(p, |x| normal_pdf(x, forward.0, forward.1)), reverse_kl: best.0 }
}

/// The three densities on [0, 10] for plotting: p, the forward fit, the reverse fit.
pub fn curves(mixture: &[Component], f: &ToyFit) -> [Vec<(f64, f64)>; 3] {
    let xs: Vec<f64> = (0..=200).map(|i| i as f64 * 0.05).collect();
    let curve = |g: &dyn Fn(f64) -> f64| xs.iter().map(|&x| (x, g(x))).collect::<Vec<_>>();
    [
        curve(&|x| mixture_pdf(mixture, x)),
        curve(&|x| normal_pdf(x, f.forward.0, f.forward.1)),
        curve(&|x| normal_pdf(x, f.reverse.0, f.reverse.1)),
    ]
}
