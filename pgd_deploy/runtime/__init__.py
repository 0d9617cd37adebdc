"""Torch-free inference runtime: pre/post-processing shared by every backend, and the backends.

Only the standard library, numpy and PIL are imported at module level anywhere under this
package; ONNX Runtime, TensorRT and pycuda load inside the backends that need them.
"""
