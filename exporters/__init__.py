"""Deployment bundles, runtime, ONNX kernels and engine configs from a Plan (see DESIGN.md)."""
