"""The toy extractors by short name, each with the attributes its training taught it
(configs/toy/nets.json, ldm/toy/nets.py): the one list of them, in a module without torch so
that the command line's listings can read it."""

TOY_NETS = {
    "toy_shape": ("shape",),
    "toy_colour": ("colour",),
    "toy_all": ("shape", "colour", "size_class"),
}
# Their registry specs (the toy library of ldm/toy/extractors.py).
TOY_ALIASES = {name: f"toy:{name.removeprefix('toy_')}" for name in TOY_NETS}
