"""Distillation settings: the command-line options (from the registry), and their resolution, once, into a
frozen DistillSettings before training starts. The run's arguments (opt.yaml, a checkpoint's 'opt') and
a checkpoint's 'distill' record are written from it; --resume reads both back (also as older releases
wrote them).

Every distillation option defaults to None ('not given'): a given option that the chosen method does not
use, or any of them without --teacher, is refused instead of ignored.
"""
import argparse
import math
from dataclasses import asdict, dataclass, field

from distill import METHODS
from distill.base import AUTO, params_fields, dest, weight_arg
from distill.teacher import TARGETS, file_sha256, previous_teachers
from utils.logging import LOGGER

DEFAULT_METHOD = "fgfi"
DISTILL_WARMUP = 100  # default imitation warm-up (iterations): the trainer's minimum LR warm-up
COMMON = {"distill_target": "neck", "distill_warmup": None, "distill_auto_ratio": 1.0, "distill_auto_iters": 20,
          "distill_schedule": "constant", "distill_final": 0.1, "distill_stop": 0}
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class DistillSettings:
    method: str
    teacher: str
    teacher_sha256: str | None
    target: str  # 'neck' or 'head' ('auto' resolved against the teacher)
    weight: float | str  # a number, or AUTO: measured over the first auto_iters imitating iterations
    warmup: int  # iterations on the detection loss alone
    auto_ratio: float
    auto_iters: int
    total: int  # the run's iterations (batches x epochs)
    params: object  # the method's frozen Params
    previous_teachers: tuple = field(default=())
    schedule: str = "constant"  # the weight's factor from 1 at the end of the warm-up to `final` at `end`
    final: float = 0.1
    end: int = 0  # iteration from which the term is off (--distill-stop epochs before the end); 0: never
    stop_epochs: int = 0

    def factor(self, iteration: int) -> float:
        """The share of the weight in force at this iteration (1 with the constant schedule; 0 from `end` on)."""
        if self.end and iteration >= self.end:
            return 0.0
        if self.schedule == "constant":
            return 1.0
        span = (self.end or self.total) - self.warmup
        p = min(max((iteration - self.warmup) / span, 0.0), 1.0) if span > 0 else 1.0
        if self.schedule == "linear":
            return 1.0 + (self.final - 1.0) * p
        return self.final + (1.0 - self.final) * (1.0 + math.cos(math.pi * p)) / 2

    def args(self) -> dict:
        """The run's distillation arguments as resolved (every registered option: None where unused)."""
        out = {d: None for d in option_dests()}
        out.update(distill_method=self.method, distill_target=self.target, distill_weight=self.weight,
                   distill_warmup=self.warmup, distill_auto_ratio=self.auto_ratio, distill_auto_iters=self.auto_iters,
                   distill_schedule=self.schedule, distill_final=self.final, distill_stop=self.stop_epochs)
        out.update({dest(f): getattr(self.params, f.name) for f in params_fields(type(self.params))})
        return out

    def record(self, weight) -> dict:
        """A distilled checkpoint's 'distill' record; `weight`: the one in force (an 'auto' weight once set)."""
        return {"method": self.method, "teacher": self.teacher, "teacher_sha256": self.teacher_sha256,
                "target": self.target, "weight": weight, "warmup": self.warmup, "auto_ratio": self.auto_ratio,
                "auto_iters": self.auto_iters, "schedule": self.schedule, "final": self.final,
                "stop": self.stop_epochs, "previous_teachers": list(self.previous_teachers),
                **asdict(self.params)}


def method_options() -> dict:
    """{dest: (flags, field metadata, names of the methods that use it)} over the registry; the fields of several
    methods by the same flag are one option, their choices and help texts joined."""
    out = {}
    for m in METHODS.values():
        for f in params_fields(m.Params):
            flags, meta, users = out.get(dest(f), (f.metadata["flags"], dict(f.metadata), []))
            if users:
                if meta["choices"]:
                    meta["choices"] = list(dict.fromkeys([*meta["choices"], *f.metadata["choices"]]))
                if f.metadata["help"] not in meta["help"]:
                    meta["help"] += "; " + f.metadata["help"]
            out[dest(f)] = (flags, meta, [*users, m.name])
        for alias in m.weight_aliases:
            out[alias.lstrip("-").replace("-", "_")] = ((alias,), None, [m.name])
    return out


def option_dests() -> list:
    return ["distill_method", "distill_weight", *COMMON, *method_options()]


def add_args(parser):
    """The distillation options: common ones, then each method's (from the registry)."""
    kd = parser.add_argument_group("distillation")
    kd.add_argument("--teacher", type=str, default="", help="frozen teacher weights (project or official .pt); "
                                                            "empty = plain training")
    kd.add_argument("--teacher-changed-ok", action="store_true",
                    help="--resume even though the teacher file changed since the run started (both are recorded)")
    kd.add_argument("--distill-method", choices=list(METHODS), default=None,
                    help="; ".join(f"{n}: {m.summary}" for n, m in METHODS.items()) + f" (default {DEFAULT_METHOD})")
    kd.add_argument("--distill-target", choices=TARGETS, default=None,
                    help="imitate the feature maps Detect consumes (neck, default), the raw Detect maps (head: needs "
                         "equal nc and anchors), or head when the teacher allows it, else neck (auto)")
    kd.add_argument("--distill-weight", type=weight_arg, default=None,
                    help="weight of the imitation term, or 'auto': set once so the weighted term starts at "
                         "--distill-auto-ratio x the detection loss (default: the method's; fgfi: 1.0 with "
                         "--distill-norm kl, auto with the other norms; cwd: 1.0 with --distill-norm none, 0.15 "
                         "with std; mgd: 0.05 with std, 2e-5 with none; sl2 0.25)")
    kd.add_argument("--distill-warmup", type=int, default=None,
                    help=f"iterations without imitation at the start (default: {DISTILL_WARMUP}, the trainer's "
                         f"minimum LR warm-up, or half the run's iterations when it is shorter than "
                         f"{2 * DISTILL_WARMUP})")
    kd.add_argument("--distill-auto-ratio", type=float, default=None,
                    help="an 'auto' weight makes the weighted term this many times the detection loss (default 1.0), "
                         "measured over the first --distill-auto-iters imitating iterations (then fixed)")
    kd.add_argument("--distill-schedule", choices=SCHEDULES, default=None,
                    help="the weight over the run after the warm-up: constant (default), or from 1x down to "
                         "--distill-final x by a linear or cosine ramp ending at the run's end (or at --distill-stop)")
    kd.add_argument("--distill-final", type=float, default=None,
                    help="the weight's last factor with a linear or cosine --distill-schedule (default 0.1)")
    kd.add_argument("--distill-stop", type=int, default=None,
                    help="train the last N epochs on the detection loss alone (default 0)")
    kd.add_argument("--distill-auto-iters", type=int, default=None,
                    help="imitating iterations that set an 'auto' weight (default 20; the term is weighted 0 then)")
    for d, (flags, meta, users) in method_options().items():
        if meta is None:  # a method's spelling of --distill-weight
            kd.add_argument(*flags, dest=d, type=weight_arg, default=None,
                            help=f"{users[0]}: the same as --distill-weight")
            continue
        kw = dict(action=argparse.BooleanOptionalAction) if meta["boolean"] else \
            dict(type=meta["type"], choices=meta["choices"])
        defaults = {u: getattr(METHODS[u].Params(), _field(d)) for u in users}
        shown = defaults[users[0]] if len(set(defaults.values())) == 1 else \
            ", ".join(f"{u} {v}" for u, v in defaults.items())
        kd.add_argument(*flags, dest=d, default=None, help=f"{meta['help']} (used by {', '.join(users)}; "
                                                           f"default {shown})", **kw)
    return parser


def _field(d):
    """The Params field name behind option dest d."""
    return next(f.name for m in METHODS.values() for f in params_fields(m.Params) if dest(f) == d)


def _settings_added_since(args: dict) -> dict:
    """A distilling run's arguments with the method's settings that its release did not have yet (None where the
    method reads them now) set to the value it trained with (the field's `before`)."""
    method = METHODS.get(args.get("distill_method") or DEFAULT_METHOD)
    if not args.get("teacher") or method is None:
        return args
    added = {dest(f): f.metadata["before"] for f in params_fields(method.Params)
             if args.get(dest(f)) is None and f.metadata["before"] is not None}
    return {**args, **added}


def legacy_dests() -> dict:
    """{old argparse dest: dest} for the options renamed since (the old spellings stay as flag aliases)."""
    return {flag.lstrip("-").replace("-", "_"): d for d, (flags, _, _) in method_options().items() for flag in flags[1:]}


def upgrade_args(args: dict) -> dict:
    """Run arguments written by an older release (every distillation option filled in, the weight of cwd and
    mgd in their own flags, FGFI's options under --distill-*; or a method's setting missing that it has now,
    such as cwd's and mgd's --distill-norm) as this release writes them."""
    if "distill_mask" not in args:
        return _settings_added_since(args)
    method = args.get("distill_method") or DEFAULT_METHOD
    out = {k: v for k, v in args.items() if k not in ("cwd_weight", "mgd_alpha")}
    weight = {"cwd": args.get("cwd_weight"), "mgd": args.get("mgd_alpha")}.get(method, args.get("distill_weight"))
    out.update({new: out.pop(old) for old, new in legacy_dests().items() if old in out})
    out.setdefault("distill_norm", "none")  # written before --distill-norm existed: the squared error
    used = {dest(f) for f in params_fields(METHODS[method].Params) if f.metadata["before"] is None} \
        if args.get("teacher") else set()  # a setting with a `before` is newer than these arguments
    for d in method_options():
        if d not in used:
            out[d] = None
    out["distill_weight"] = weight if args.get("teacher") else None
    if not args.get("teacher"):
        out.update(distill_method=None, **dict.fromkeys(COMMON))
    return _settings_added_since(out)


def check_given(opt):
    """Refuse distillation options that the run will not use: any without --teacher, or one the chosen method
    does not read."""
    options = method_options()
    flags = {d: flags[0] for d, (flags, _, _) in options.items()}
    given = [d for d in option_dests() if getattr(opt, d, None) is not None]
    if not opt.teacher:
        if given:
            raise ValueError(f"{_flag(given[0], flags)} needs --teacher (without it the run is plain training)")
        return
    method = opt.distill_method or DEFAULT_METHOD
    for d in given:
        users = options.get(d, (None, None, [method]))[2]
        if method not in users:
            raise ValueError(f"{_flag(d, flags)} is a flag of --distill-method {' / '.join(users)}; "
                             f"--distill-method {method} does not use it")
    aliases = [d for d in given if d in flags and options[d][1] is None]
    if aliases and opt.distill_weight is not None:
        raise ValueError(f"{_flag(aliases[0], flags)} and --distill-weight both given: they set the same weight")


def _flag(d, flags):
    return flags.get(d, "--" + d.replace("_", "-"))


def distill_warmup(warmup: int | None, nb: int, epochs: int) -> int:
    """The imitation warm-up for a run of nb batches x epochs: --distill-warmup as given (with a warning
    when the term would never start), or by default DISTILL_WARMUP capped to half the run."""
    total = nb * epochs
    if warmup is None:
        warmup = min(DISTILL_WARMUP, total // 2)
        if warmup < DISTILL_WARMUP:
            LOGGER.warning(f"WARNING ⚠️ distill: warm-up shortened to {warmup} iterations, half of this run's "
                           f"{total} ({nb} batches x {epochs} epochs); the default {DISTILL_WARMUP} needs a run of "
                           f"at least {2 * DISTILL_WARMUP} iterations")
    elif warmup >= total:
        LOGGER.warning(f"WARNING ⚠️ distill: --distill-warmup {warmup} >= this run's {total} iterations ({nb} "
                       f"batches x {epochs} epochs): the imitation term stays 0 for the whole run, which trains as a "
                       f"baseline with the teacher loaded; pass a smaller --distill-warmup or more epochs")
    return warmup


def resolve(opt, teacher, nb: int, epochs: int, record: dict | None = None, epoch: int = 0) -> DistillSettings:
    """The settings of a distilling run, from its arguments (checked by check_given), the loaded Teacher and the
    run length (nb batches x epochs). record: a resumed checkpoint's 'distill' record (its measured 'auto'
    weight, its teachers), epoch: the checkpoint's epoch."""
    check_given(opt)
    cls = METHODS[opt.distill_method or DEFAULT_METHOD]
    params = cls.Params(**{f.name: getattr(opt, dest(f)) for f in params_fields(cls.Params)
                           if getattr(opt, dest(f), None) is not None})
    alias = next((getattr(opt, a.lstrip("-").replace("-", "_"), None) for a in cls.weight_aliases), None)
    weight = next((w for w in (opt.distill_weight, alias) if w is not None), cls.default_weight(params))
    if weight == AUTO and record and isinstance(record.get("weight"), (int, float)):
        weight = float(record["weight"])  # measured before the run was stopped
    common = {k: getattr(opt, k) if getattr(opt, k, None) is not None else v for k, v in COMMON.items()}
    stop = int(common["distill_stop"])
    if not 0 <= stop < epochs or common["distill_final"] < 0:
        raise ValueError(f"--distill-stop {stop} must be in [0, {epochs}) (the run's epochs) and --distill-final "
                         f"{common['distill_final']} >= 0")
    return DistillSettings(
        method=cls.name, teacher=str(opt.teacher), teacher_sha256=file_sha256(opt.teacher),
        target=teacher.resolve_target(common["distill_target"]), weight=weight,
        warmup=distill_warmup(common["distill_warmup"], nb, epochs), auto_ratio=float(common["distill_auto_ratio"]),
        auto_iters=int(common["distill_auto_iters"]), total=nb * epochs, params=params,
        schedule=common["distill_schedule"], final=float(common["distill_final"]), end=nb * (epochs - stop) if stop else 0, stop_epochs=stop,
        previous_teachers=previous_teachers(record, opt.teacher, opt.teacher_changed_ok, epoch) if record else ())


def build_method(settings: DistillSettings, student, teacher, anchor_t=None):
    """The method's module for this student and teacher (every method is given the same context: the loss's
    anchor_t and the Teacher, which a method may read but never trains)."""
    student_ch, teacher_ch = teacher.channels(student, settings.target)
    return METHODS[settings.method](settings, student_ch, teacher_ch, anchor_t=anchor_t, teacher=teacher)
