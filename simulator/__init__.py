"""SimPy discrete-event simulation of MoE inference under a Plan (see DESIGN.md)."""
