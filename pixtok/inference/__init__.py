"""The inference core: request validation, image decoding and the model runners behind
every server (TorchServe handlers, the KServe model server, the benchmarks). It never imports
`ts`, and it ships inside each TorchServe archive as part of the `pixtok` package."""
