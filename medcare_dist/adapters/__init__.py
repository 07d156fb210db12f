"""Adapter machinery with no MedCare in it: LoRA (its names, delta and merge) and the AdapterSet that keeps adapters outside the ZeRO-3 module tree."""
