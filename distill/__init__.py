"""Knowledge distillation for YOLOv5: the methods, registered by name (the --distill-method choices)."""
from distill.cwd import CWD
from distill.fgfi import FGFI
from distill.mgd import MGD
from distill.sl2 import SL2

METHODS = {m.name: m for m in (FGFI, CWD, MGD, SL2)}
