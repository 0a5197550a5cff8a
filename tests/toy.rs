//! Figure 2's toy: the forward-KL fit is the moment match (checked by its optimality: no
//! perturbation lowers KL(p‖q)); the reverse-KL fit is a local minimum of KL(q‖p) that sits on
//! the larger mode, and each fit beats the other on its own objective.

use minillm::demo::toy::{fit, mixture_pdf, normal_pdf, MIXTURE};

/// KL(a‖b) by the trapezoid rule on a fine grid, independent of the module's integrator.
fn kl(a: impl Fn(f64) -> f64, b: impl Fn(f64) -> f64) -> f64 {
    let (lo, hi, n) = (-15.0, 25.0, 40_000);
    let h = (hi - lo) / n as f64;
    (0..=n)
        .map(|i| {
            let x = lo + i as f64 * h;
            let (pa, pb) = (a(x), b(x));
            let w = if i == 0 || i == n { 0.5 } else { 1.0 };
            if pa < 1e-300 {
                0.0
            } else {
                w * h * pa * (pa.ln() - pb.max(1e-300).ln())
            }
        })
        .sum()
}

#[test]
fn forward_fit_covers_both_modes_and_reverse_fit_seeks_the_larger_one() {
    let f = fit(&MIXTURE);
    let p = |x: f64| mixture_pdf(&MIXTURE, x);
    let fkl = |mu: f64, s: f64| kl(p, |x| normal_pdf(x, mu, s));
    let rkl = |mu: f64, s: f64| kl(|x| normal_pdf(x, mu, s), p);
    for (dm, ds) in [(0.05, 0.0), (-0.05, 0.0), (0.0, 0.05), (0.0, -0.05)] {
        assert!(fkl(f.forward.0 + dm, f.forward.1 + ds) > fkl(f.forward.0, f.forward.1));
        assert!(rkl(f.reverse.0 + dm, f.reverse.1 * (1.0 + ds)) > rkl(f.reverse.0, f.reverse.1));
    }
    assert!((fkl(f.forward.0, f.forward.1) - f.forward_kl).abs() < 1e-4);
    assert!((rkl(f.reverse.0, f.reverse.1) - f.reverse_kl).abs() < 1e-4);
    assert!(fkl(f.forward.0, f.forward.1) < fkl(f.reverse.0, f.reverse.1));
    assert!(rkl(f.reverse.0, f.reverse.1) < rkl(f.forward.0, f.forward.1));
    // Mode seeking: the reverse fit sits on the heavier component and is narrower than the
    // forward fit, which sits between the modes.
    let (heavy, light) = (MIXTURE[1], MIXTURE[0]);
    assert!((f.reverse.0 - heavy.1).abs() < 0.3, "{:?}", f.reverse);
    assert!(f.forward.0 > light.1 + 1.0 && f.forward.0 < heavy.1 - 1.0);
    assert!(f.reverse.1 < f.forward.1 / 2.0);
}
