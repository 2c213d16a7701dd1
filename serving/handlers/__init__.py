"""TorchServe handler files. Each is copied into an archive as handler.py and imports the model
code shipped beside it (the pixtok_model package inside the .mar), never this repository."""
