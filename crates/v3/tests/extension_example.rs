//! The README's worked example extension (crates/v3/examples/extension.rs) builds, hooks the
//! exit loop and answers its hypercall.

#[allow(dead_code)]
#[path = "../examples/extension.rs"]
mod example;

#[test]
fn the_example_extension_counts_port_writes_and_answers_its_hypercall() {
    let outcome = example::run().expect("run the example VM");
    // out 0x80 three times, then the doorbell's own out: the hypercall answered 4, which the
    // guest wrote to the debug-exit port.
    assert_eq!(outcome, palacios_vmm::Outcome::DebugExit(4));
}
