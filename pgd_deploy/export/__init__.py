"""`pgd-export`: ONNX / TensorRT / Triton artifacts with accuracy gates and a sidecar manifest.

Modules (import them directly; this package imports nothing heavy):
    deploy_model: the fixed export contract (`DeployModel`, I/O names, opset).
    source, images: the checkpoint being exported; gate and calibration images.
    to_onnx: PyTorch -> ONNX (legacy exporter by default), onnxslim, metadata;
        `export_checkpoint_onnx` is the quick, ungated path.
    nms: the optional in-graph NMS (standard ONNX NonMaxSuppression, padded outputs).
    precision: fp16 (mixed precision, fp32 decode tail) and int8 (Q/DQ) ONNX-to-ONNX conversions.
    parity, gates: the three accuracy gates and the gate report.
    manifest: the sidecar manifest (versions, provenance, gate results).
    to_tensorrt: the strongly typed TensorRT engine build (TensorRT 10 and 11).
    triton: the Triton model repository and its strict config parser.
    bench: the latency benchmark table and the speed-accuracy plot.
    pipeline, command: the end-to-end export and the `pgd-export` console script.
"""
