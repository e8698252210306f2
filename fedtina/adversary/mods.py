"""ClientApp mods: what happens to every training reply on its way out, whatever the method.

Order in the ClientApp (outermost first): `attack_mod` (a poisoned client replaces what it sends; outermost, so an
attacker is bound by no clipping), `upload_privacy_mod` (clip + noise a zoo upload, fedtina/adversary/privacy.py),
`fedavg_clip_mod` (Flower's `fixedclipping_mod`, for the messages Flower's DP strategy wrapper configured). Each reads
its settings from the message's config, so a run without faults or privacy passes through all three untouched.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message

from fedtina.adversary.attacks import UPDATE_ATTACKS, Attack, poison_head, poison_update
from fedtina.runtime.spec import Faults, arrays_record, head_record, record_arrays, record_head


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".", 1)[0] == "train"


def _cid(ctx: Context) -> int:
    return int(ctx.node_config["partition-id"])


def attack_from_config(cfg) -> Attack:
    """The Attack a message's config (the run's Faults) describes; a key it lacks takes Faults' default."""
    d = Faults()
    return Attack(kind=str(cfg.get("poison_kind", d.poison_kind)),
                  factor=float(cfg.get("poison_factor", d.poison_factor)),
                  share=float(cfg.get("mislabel_share", d.mislabel_share)),
                  target=int(cfg.get("poison_target", d.poison_target)),
                  collude=bool(cfg.get("poison_collude", d.poison_collude)))


def attack_mod(msg: Message, ctx: Context, call_next) -> Message:
    """A client in `poison_clients` sends a bad head (zoo upload: `head`) or a bad update (`arrays`) instead of
    its own; `mislabeled` is played inside `train.finetune` (it needs the client's data). Its own reported score
    stays that of its honest model."""
    reply = call_next(msg, ctx)
    cfg = msg.content["config"] if "config" in msg.content else None
    if (cfg is None or reply.has_error() or not _is_train(msg)
            or _cid(ctx) not in list(cfg.get("poison_clients", []))):
        return reply
    attack = attack_from_config(cfg)
    if "head" in reply.content and attack.kind != "mislabeled":
        head = record_head(reply.content["head"], cfg["class_names"])
        reply.content["head"] = head_record(poison_head(head, attack, _cid(ctx)))
    elif "arrays" in reply.content and "arrays" in msg.content and attack.kind in UPDATE_ATTACKS:
        bad = poison_update(record_arrays(msg.content["arrays"]), record_arrays(reply.content["arrays"]), attack,
                            _cid(ctx))
        reply.content["arrays"] = arrays_record(bad)
    return reply


def upload_privacy_mod(msg: Message, ctx: Context, call_next) -> Message:
    """With `upload_clip` > 0: the uploaded head's difference from the received one clipped and noised. The noise is
    seeded by (client, round) so that a simulation replays; a deployment would draw it from the OS."""
    from fedtina.adversary.privacy import PrivacyConfig, clip_and_noise

    reply = call_next(msg, ctx)
    cfg = msg.content["config"] if "config" in msg.content else None
    d = PrivacyConfig()
    clip = float(cfg.get("upload_clip", d.upload_clip)) if cfg is not None else 0.0
    if clip <= 0 or reply.has_error() or "head" not in reply.content:
        return reply
    names = cfg["class_names"]
    rng = np.random.default_rng([_cid(ctx), int(cfg.get("round", 0)), 7])
    private = clip_and_noise(record_head(msg.content["head"], names), record_head(reply.content["head"], names),
                             clip, float(cfg.get("upload_noise", d.upload_noise)), rng)
    reply.content["head"] = head_record(private)
    return reply


def fedavg_clip_mod(msg: Message, ctx: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` on the training messages that carry Flower's clipping norm (those configured by
    `DifferentialPrivacyClientSideFixedClipping`); every other message passes (the mod itself would refuse them).
    The reply's weight (`num-examples`, read only by the aggregation) becomes 1: the wrapper's noise is calibrated
    for the unweighted mean of clipped updates."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if not _is_train(msg) or "config" not in msg.content or KEY_CLIPPING_NORM not in msg.content["config"]:
        return call_next(msg, ctx)
    reply = fixedclipping_mod(msg, ctx, call_next)
    if not reply.has_error() and "metrics" in reply.content:
        reply.content["metrics"]["num-examples"] = 1
    return reply
