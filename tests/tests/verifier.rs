//! The programs' headroom under the verifier's budget on this kernel. The kernel refuses a
//! program whose verification walks more than a million instructions, and how far it walks
//! moves with the kernel version and the compiler's output as well as with our code: a
//! program that passed with little to spare on one machine was refused on the next kernel.
//! Each program must verify within half the budget.

use forwarder::loader::{LoadOptions, VERIFIER_LIMIT, verifier_costs};

#[test]
fn every_program_verifies_within_half_the_budget() {
    let costs = verifier_costs(&LoadOptions::default()).unwrap();
    for c in &costs {
        match &c.walked {
            Ok(n) => println!(
                "{:<24} {n:>8} instructions walked ({:.0}% of the budget)",
                c.program,
                100.0 * *n as f64 / VERIFIER_LIMIT as f64
            ),
            Err(e) => println!("{:<24} refused: {e}", c.program),
        }
    }
    let refused: Vec<_> = costs.iter().filter(|c| c.walked.is_err()).map(|c| c.program).collect();
    assert!(refused.is_empty(), "refused by the verifier: {refused:?}");
    for c in &costs {
        let n = *c.walked.as_ref().unwrap();
        assert!(n <= VERIFIER_LIMIT / 2, "{}: {n} instructions walked, over half the verifier's budget", c.program);
    }
}
