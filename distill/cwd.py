"""Channel-wise distillation, CWD (Shu et al., ICCV 2021): every channel of a map becomes a distribution over
the map's cells (softmax of map / tau); the adapted student's distributions imitate the teacher's in
KL(teacher || student). A level's loss: tau^2 x sum over images, channels and cells of that KL / (channels
x images).

Norm 'none' (the default) applies the softmax to the maps as they are; norm 'std' first standardises both maps
per channel over the batch and the cells (mean 0, variance 1, no learned affine, as mmyolo's and DAMO-YOLO's
CWD do on neck outputs), so the softmax's sharpness depends on neither feature scale. On the standard recipe
the raw maps pay more (+18% of the teacher-baseline gap against +9%, 3 seeds:
benchmarks/results/standard_recipe_methods.md)."""
from dataclasses import dataclass

from distill.adapters import ADAPTER_HELP, ADAPTERS, build_adapters
from distill.base import DistillMethod, option
from distill.kernels import STD_NORM_HELP, STD_NORMS, channel_kl, check_std_norm, standardize_channels

# The default weight per norm. Standardised maps make every channel's softmax sharper than YOLOv5's SiLU
# outputs do: at weight 1 the first imitating epoch's term is ~18x the detection loss on the standard recipe
# (benchmarks/results/standard_recipe_std_weight_probe.md); 0.15 starts it near 3x, where FGFI's default
# term starts and pays.
WEIGHTS = {"std": 0.15, "none": 1.0}


@dataclass(frozen=True)
class CWDParams:
    tau: float = option(1.0, "--cwd-tau", type=float, help="cwd: softmax temperature")
    adapter: str = option("1x1", "--distill-adapter", choices=ADAPTERS[:2], help=ADAPTER_HELP)
    norm: str = option("none", "--distill-norm", choices=STD_NORMS, help=STD_NORM_HELP, before="none")

    def __post_init__(self):
        if not float(self.tau) > 0:
            raise ValueError(f"--cwd-tau must be > 0, got {self.tau}")
        if self.adapter not in ADAPTERS[:2]:
            raise ValueError(f"cwd: bad adapter '{self.adapter}'")
        check_std_norm("cwd", self.norm)


class CWD(DistillMethod):
    name = "cwd"
    summary = "channel-wise distillation (Shu et al., ICCV 2021): per channel, softmax over the map's cells, KL"
    Params = CWDParams
    weight_aliases = ("--cwd-weight",)

    @classmethod
    def default_weight(cls, params):
        return WEIGHTS[params.norm]

    def __init__(self, settings, student_ch, teacher_ch, anchor_t=None, teacher=None):
        super().__init__(settings, student_ch, teacher_ch)
        self.add_adapters(build_adapters(student_ch, teacher_ch, "none" if self.target == "head" else
                                         self.params.adapter))

    def level_loss(self, k, s, t, mask):
        a = self.adapters[k](s)
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"adapted student has {a.shape[1]} channels, teacher {t.shape[1]}")
        if self.params.norm == "std":
            a, t = standardize_channels(a), standardize_channels(t)
        return channel_kl(a, t, self.params.tau)
