"""TorchServe handler files. Each is copied into an archive as handler.py and imports the core
package shipped beside it (pixtok/ inside the .mar), which it puts first on sys.path."""
