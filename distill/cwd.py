"""Channel-wise distillation, CWD (Shu et al., ICCV 2021): every channel of a map becomes a distribution over
the map's cells (softmax of map / tau); the adapted student's distributions imitate the teacher's in
KL(teacher || student). A level's loss: tau^2 x sum over images, channels and cells of that KL / (channels
x images)."""
from dataclasses import dataclass

from distill.adapters import ADAPTERS, build_adapters
from distill.base import DistillMethod, option
from distill.fgfi import ADAPTER_HELP
from distill.kernels import channel_kl


@dataclass(frozen=True)
class CWDParams:
    tau: float = option(1.0, "--cwd-tau", type=float, help="cwd: softmax temperature")
    adapter: str = option("1x1", "--distill-adapter", choices=ADAPTERS[:2], help=ADAPTER_HELP)

    def __post_init__(self):
        if not float(self.tau) > 0:
            raise ValueError(f"--cwd-tau must be > 0, got {self.tau}")
        if self.adapter not in ADAPTERS[:2]:
            raise ValueError(f"cwd: bad adapter '{self.adapter}'")


class CWD(DistillMethod):
    name = "cwd"
    summary = "channel-wise distillation (Shu et al., ICCV 2021): per channel, softmax over the map's cells, KL"
    Params = CWDParams
    weight_aliases = ("--cwd-weight",)

    def __init__(self, settings, student_ch, teacher_ch, anchor_t=None, teacher=None):
        super().__init__(settings, student_ch, teacher_ch)
        self.add_adapters(build_adapters(student_ch, teacher_ch, "none" if self.target == "head" else
                                         self.params.adapter))

    def level_loss(self, k, s, t, mask):
        a = self.adapters[k](s)
        if a.shape[1] != t.shape[1]:
            raise ValueError(f"adapted student has {a.shape[1]} channels, teacher {t.shape[1]}")
        return channel_kl(a, t, self.params.tau)
