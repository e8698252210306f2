"""Tina: the server generates each client's head from the description of its classes (text, image prompts or both).

Clients arrive in `rounds` cohorts; per cohort one batched generation, then (with `finetune`) one `train.finetune`
per labelled client that scores the received head and fine-tunes it on the client's labels (`evaluate.head` for the
others), the upload (an echo, the sent head unchanged, is counted and dropped), the server's gate, the accepted heads
appended to the run's zoo with their evidence, and a Tina refresh every `refresh_every` accepted heads, adopted only
when it does not lower Tina's accuracy on the server's probe set (fedtina/tina/probe.py), else rolled back. New
clients arrive after the last cohort and are served by generation alone (then fine-tuned, without upload). A
checkpoint follows every cohort; a resumed run continues after the last one, with that point's zoo and Tina.
Results: `tina` (the generated head) and `tina_ft`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Message

from fedtina.config import NON_NEGATIVE, POSITIVE, bounded
from fedtina.errors import FedtinaError
from fedtina.server.gate import HeadCheckConfig, plausible_row_norm
from fedtina.server.federation import Federation
from fedtina.server.ledger import mean_std
from fedtina.runtime.grid import PROGRESS_MIN
from fedtina.report.profiling import PhaseTimer
from fedtina.runtime.spec import record_head
from fedtina.tina.probe import draw_class_sets, probe_set
from fedtina.tina.service import GENERATE_BATCH, TinaService, Upload, malformed, restore_zoo, uploaded_rows
from fedtina.zoo.heads import Head
from fedtina.methods.registry import Method, register
from fedtina.progress import Meter

log = logging.getLogger("fedtina.federation")
PROMPTS = ("text", "images", "both")
ZERO_FT = "tina_ft fine-tunes on the client's labels; this client has none (its tina row is the generated head)"


@dataclass
class TinaOptions:
    finetune: bool = True       # clients fine-tune the generated head and upload it (-> tina_ft, zoo growth)
    refresh_every: int = bounded(20, NON_NEGATIVE)  # refresh Tina after this many accepted heads (0 = never)
    refresh_steps: int = bounded(30, POSITIVE)  # training steps per refresh (warm start on the grown zoo)
    gen_seed: int = bounded(0, NON_NEGATIVE)           # generation noise seed
    sample_steps: int = bounded(0, NON_NEGATIVE)  # DDIM steps per generated head; 0: the Tina's own
                                                  # (tina.sample_steps). Cost is linear in it; `analyses
                                                  # analysis=sample_steps` measured 2-5 steps as accurate as 20
    prompt: str = "text"        # what a client describes its classes by: text | images | both (images: the mean
                                # feature of its labelled training images of each class)
    bank: bool = False          # serve a class no prepared zoo head holds by the mean row of the run's accepted
                                # uploads that held it; Tina's generated row otherwise (bench_uploads' tina_bank)
    probe_tasks: int = bounded(64, NON_NEGATIVE)  # label sets of the server's probe set; a refresh that lowers
                                                  # Tina's accuracy on it is rolled back (0: every refresh adopted)


@dataclass
class TinaState:
    """Where Tina's cohorts stand, for `resume` (saved after every cohort)."""

    round: int = 0                    # cohorts finished
    pending: int = 0                  # accepted heads since the last refresh
    norm_scale: float | None = None   # the gate's row-norm scale, fixed for the run
    zoo_size: int | None = None       # the run's zoo after the last finished cohort
    checkpoint: str | None = None     # the run's Tina after it (None: the cached one)
    probe_sets: list[list[int]] | None = None   # the probe's label sets (class ids), drawn once per run
    probe: float | None = None        # the current Tina's probe accuracy


def tina_service(fed: Federation, zoo, state: TinaState) -> TinaService:
    """The run's Tina service on its zoo: the checkpoint's Tina on a resume, the gate's row-norm scale fixed at the
    run's start (the gate does not drift with what it admits)."""
    from fedtina.tina.train import load_checkpoint

    opts = fed.options("tina", TinaOptions)
    if state.norm_scale is None:
        state.norm_scale = plausible_row_norm(zoo.entries(), fed.assets.bank.generic_weight)
        state.zoo_size = len(zoo)
        fed.checkpoint()
    tina = load_checkpoint(state.checkpoint, fed.assets.encoder) if state.checkpoint else fed.assets.tina
    probe = None
    if opts.probe_tasks and opts.refresh_every:
        if state.probe_sets is None:
            state.probe_sets = [list(s) for s in draw_class_sets(fed.roster.partition, fed.assets.dataset.labels,
                                                                 opts.probe_tasks)]
        probe = probe_set(state.probe_sets, fed.assets.dataset.class_names, fed.reference.val_data)
    service = TinaService(tina, fed.assets, fed.reference, zoo, HeadCheckConfig(**fed.spec.checks),
                          state.norm_scale, prompt=opts.prompt, sample_steps=opts.sample_steps,
                          gen_seed=opts.gen_seed, bank=uploaded_rows(zoo) if opts.bank else None, probe=probe,
                          probe_now=state.probe)
    if probe is not None and state.probe is None:
        state.probe = service.probe_now = service.probe_score()
        fed.progress("tina", None, fed.spec.rounds, f"probe set: {len(probe)} label sets over the server's held-out "
                     f"images; Tina {state.probe:.3f}")
    return service


def run_tina(fed: Federation, state: TinaState) -> None:
    """Clients arrive in `rounds` cohorts (by client id). Per cohort: one batched generation for every usable
    description, `evaluate.head`, then (method.finetune) `train.finetune` with upload, the server's checks, the
    accepted heads appended to the run's zoo, and a Tina refresh every `refresh_every` accepted heads. A checkpoint
    follows every cohort; a resumed run continues after the last one, with that point's zoo and Tina."""
    from fedtina.zoo.store import ZooStore

    if state.round:
        log.info("[tina] resuming after cohort %d", state.round)
    if state.zoo_size is not None:
        restore_zoo(Path(fed.spec.zoo_dir), state.zoo_size)
    with ZooStore(Path(fed.spec.zoo_dir)) as zoo:
        _tina_rounds(fed, tina_service(fed, zoo, state), state)


def refresh_tina(fed: Federation, service: TinaService, state: TinaState, rnd: int):
    """Continue training Tina on the grown zoo for `refresh_steps` steps (warm start from the current weights and
    normalisation). Adopted (the probe set does not score it lower): saved atomically as the run's Tina and as this
    cohort's (`tina-c<rnd>`, which a resumed run restarts from); rolled back: the current Tina stays. Returns the
    service's RefreshDecision."""
    opts = fed.options("tina", TinaOptions)
    cohort_path = Path(fed.spec.tina_path).with_name(f"tina-c{rnd}.safetensors")
    with PhaseTimer() as t:
        decision = service.refresh(opts.refresh_steps, save=(cohort_path, Path(fed.spec.tina_path)))
    n = len(service.zoo)
    verdict = "adopted" if decision.adopted else "rolled back"
    probe = f"; probe {decision.before:.3f} -> {decision.after:.3f}" if service.probe is not None else ""
    fed.server_record("tina", rnd, "refresh", t, status="ok" if decision.adopted else "rolled back",
                      detail=f"{opts.refresh_steps} steps on {n} heads: {verdict}{probe}")
    fed.progress("tina", rnd, fed.spec.rounds, f"Tina refreshed on {n} zoo heads ({opts.refresh_steps} steps, "
                 f"{t.wall_s:.1f} s): {verdict}{probe}")
    if decision.adopted:
        state.checkpoint = str(cohort_path)
    else:
        log.warning("[tina] round %d: the refresh lowered Tina's probe accuracy (%.3f -> %.3f): rolled back", rnd,
                    decision.before, decision.after)
    if service.probe is not None:
        state.probe = service.probe_now
    return decision


ECHO = "unchanged from the head the server sent: nothing to learn, not appended to the zoo"


def check_uploads(fed: Federation, service: TinaService, ok: dict[int, Message], rnd: int,
                  sent: dict[int, Head]) -> tuple[list, int, int]:
    """Run every uploaded head through the server's gate, against the selection head and the head the server sent
    that node (`sent`): (accepted ZooEntries, number refused, number of echoes). An echo (the sent head unchanged)
    skips the gate and is dropped. The verdict and its reason also go on the client's tina_ft result of this round
    (`upload`: accepted | refused | echo, `upload_detail`). An entry's evidence, its images per class, is the
    partition's count, not the client's word."""
    rows = {r.client_id: r for r in fed.out.results if r.method == "tina_ft" and r.round == rnd}
    entries, refused, echoes = [], 0, 0
    for node, rep in ok.items():
        c = fed.clients[node]
        with PhaseTimer() as t:
            try:
                up = Upload(c.client_id, c.names, c.class_ids, sent[node], record_head(rep.content["head"], c.names),
                            images=fed.roster.labels(c.client_id) / max(len(c.names), 1))
                echo = up.echo
            except Exception as e:  # noqa: BLE001 - a malformed upload is refused, never fatal
                res, echo = malformed(e), False
            else:
                res = None if echo else service.check(up)
        if echo:
            echoes += 1
            if c.client_id in rows:
                rows[c.client_id].upload, rows[c.client_id].upload_detail = "echo", ECHO
            continue
        reason = res.reason
        if res.accepted and res.class_drop is not None:  # how close an accepted head came to the limit
            reason = f"{reason} (largest class-pair AUC drop {res.class_drop:.2f})"
        if c.client_id in rows:
            rows[c.client_id].upload = "accepted" if res.accepted else "refused"
            rows[c.client_id].upload_detail = reason
        if res.accepted:
            entries.append(up.entry({"acc": float(rep.content["metrics"]["acc"]), "cohort": float(rnd),
                                     "server_val_acc": float(res.acc) if res.acc is not None else float("nan")}))
            fed.server_record("tina", rnd, "check", t, cid=c.client_id, acc=res.acc, detail=reason)
        else:
            refused += 1
            log.warning("[tina] round %d: refused the head uploaded by client %d: %s", rnd, c.client_id, reason)
            fed.server_record("tina", rnd, "check", t, cid=c.client_id, acc=res.acc, status="refused", detail=reason)
    return entries, refused, echoes


def generate(fed: Federation, service: TinaService, clients: list, rnd: int) -> dict[int, Head]:
    """The heads the server sends these clients (the service's batched generation, whatever each one's prompts
    are), by node in the clients' order: the uploads (and so the zoo a refresh trains on) keep it."""
    with PhaseTimer() as t, Meter(len(clients), f"[tina:{rnd}] generate", unit="heads",
                                  enabled=len(clients) >= PROGRESS_MIN) as meter:
        heads = service.serve([c.names for c in clients], shots=[c.shots for c in clients],
                              stop=fed.spec.stop.check, meter=meter)
    n_batches = -(-len(clients) // GENERATE_BATCH)
    fed.server_record("tina", rnd, "generate", t, detail=f"{len(clients)} heads in {n_batches} batch(es)")
    return {c.node_id: h for c, h in zip(clients, heads)}


def serve(fed: Federation, clients: list, by_node: dict[int, Head], rnd: int, opts: "TinaOptions",
          upload: bool) -> dict[int, Message]:
    """Score the generated heads (`tina`) and, with `finetune`, the fine-tuned ones (`tina_ft`); the fine-tune
    replies by node. A client with labels gets one `train.finetune` message that first evaluates the received head
    (a message per client instead of two: at 100,000 clients the per-message cost dominates); a client without
    labels gets `evaluate.head` (its tina_ft is unserved)."""
    tune = fed.labelled("tina_ft", clients, rnd, ZERO_FT) if opts.finetune else []
    tuned = {c.node_id: by_node[c.node_id] for c in tune}   # in the clients' order, as the zoo appends them
    only_eval = {n: h for n, h in by_node.items() if n not in tuned}
    fed.score(fed.send_heads("evaluate", only_eval, "tina", rnd, fail=["tina"]), "tina", rnd)
    if not tune:
        return {}
    ok = fed.send_heads("finetune", tuned, "tina_ft", rnd, fail=["tina", "tina_ft"],
                        received_as="tina", **fed.finetune_config(upload=upload))
    fed.score(ok, "tina", rnd, key="received")
    fed.score(ok, "tina_ft", rnd)
    return ok


def _tina_rounds(fed: Federation, service: TinaService, state: TinaState) -> None:
    spec, opts, zoo = fed.spec, fed.options("tina", TinaOptions), service.zoo
    methods = ["tina", "tina_ft"] if opts.finetune else ["tina"]
    fed.out.rounds.update({m: spec.rounds for m in methods})
    pending = state.pending  # accepted heads since the last refresh
    old = [fed.client_id(n) for n in fed.old]
    for rnd, cohort in enumerate(np.array_split(np.asarray(old, dtype=np.int64), spec.rounds), start=1):
        if rnd <= state.round:
            continue  # finished before a resume
        clients = fed.usable(fed.cohort_nodes(cohort), methods, rnd)
        accepted = refused = echoes = 0
        entries, decision = [], None
        zoo_at_arrival = len(zoo)  # the zoo Tina was trained on when this cohort asked
        if clients:
            by_node = generate(fed, service, clients, rnd)
            ok = serve(fed, clients, by_node, rnd, opts, upload=True)
            if opts.finetune:
                entries, refused, echoes = check_uploads(
                    fed, service, {n: r for n, r in ok.items() if "head" in r.content}, rnd, by_node)
                if entries:
                    with PhaseTimer() as t:
                        service.admit(entries)
                    fed.server_record("tina", rnd, "zoo", t, detail=f"appended {len(entries)} heads")
                accepted = len(entries)
                pending += accepted
                if opts.refresh_every > 0 and pending >= opts.refresh_every:
                    decision = refresh_tina(fed, service, state, rnd)
                    pending = 0
        fed.out.zoo_growth.append(cohort_row(fed, rnd, zoo_at_arrival, len(zoo), entries, refused, echoes, decision,
                                             state))
        ft = f" (after ft {mean_std(fed.round_accs('tina_ft', rnd)[0])})" if opts.finetune else ""
        fed.progress("tina", rnd, spec.rounds, f"{fed.acc_line('tina', rnd)}{ft}, {accepted} heads accepted"
                     f"{f', {refused} refused' if refused else ''}{f', {echoes} echoes dropped' if echoes else ''}, "
                     f"zoo {len(zoo)}")
        state.round, state.pending, state.zoo_size = rnd, pending, len(zoo)
        fed.checkpoint()
    _new_clients(fed, service, methods, opts)


def cohort_row(fed: Federation, rnd: int, zoo_before: int, zoo_after: int, entries: list, refused: int,
               echoes: int, decision, state: TinaState) -> dict:
    """The report's row of a cohort: its clients' accuracy, the zoo's growth and what entered it (accepted uploads
    by their evidence, refused ones, dropped echoes), the refresh's verdict with the probe scores, and Tina's probe
    accuracy after the cohort."""
    accs, _, _ = fed.round_accs("tina", rnd)
    images = [e.metrics["images_per_class"] for e in entries]
    return {"round": rnd, "zoo_size": zoo_before, "zoo_size_after": zoo_after,
            "mean_acc": float(np.mean(accs)) if accs else None, "std_acc": float(np.std(accs)) if accs else None,
            "accepted": len(entries), "refused": refused, "echoes": echoes,
            "accepted_images_per_class": float(np.mean(images)) if images else None,
            "refresh": "" if decision is None else ("adopted" if decision.adopted else "rolled back"),
            "probe_before": None if decision is None or state.probe is None else decision.before,
            "probe_after": None if decision is None or state.probe is None else decision.after,
            "probe": state.probe}


def _new_clients(fed: Federation, service: TinaService, methods: list[str], opts: "TinaOptions") -> None:
    """After the last cohort: generation from each new client's description (the final Tina, no label needed);
    with `finetune`, the generated head fine-tuned on its labels, not uploaded (the federation is over)."""
    rnd = fed.spec.rounds
    clients = fed.usable(fed.new, methods, rnd)
    if not clients:
        return
    serve(fed, clients, generate(fed, service, clients, rnd), rnd, opts, upload=False)
    fed.progress("tina", None, rnd, f"new clients: {fed.acc_line('tina', rnd, new=True)}")


def _validate(opts: TinaOptions, cfg: dict) -> None:
    from fedtina.validate import one_of

    one_of("method.tina.prompt", opts.prompt, PROMPTS)
    timesteps = (cfg.get("tina") or {}).get("timesteps")
    if timesteps is not None and opts.sample_steps > timesteps:
        raise FedtinaError(f"method.tina.sample_steps={opts.sample_steps} exceeds the {timesteps} diffusion steps "
                           f"Tina was trained with (tina.timesteps)")
    if opts.prompt != "text" and (cfg.get("encoder") or {}).get("image_prompts", "backbone") != "backbone":
        raise FedtinaError(f"method.tina.prompt={opts.prompt} sends the class means of the clients' backbone features: "
                           f"it needs encoder.image_prompts=backbone (clients do not run the CLIP image tower)")
    from fedtina.config import from_dict
    from fedtina.data.partition import PartitionConfig, new_clients

    clients, rounds = cfg.get("clients"), cfg.get("rounds")
    if rounds is not None and clients is not None:
        old = clients - new_clients(from_dict(PartitionConfig, cfg.get("partition")), clients)
        if rounds > old:
            raise FedtinaError(f"rounds={rounds} exceeds the {old} clients that train (clients={clients} minus the "
                               f"new ones): tina serves them in `rounds` cohorts, so {rounds - old} cohorts would be "
                               f"empty; need rounds <= {old}")


register(Method("tina", run_tina, TinaOptions, results=("tina", "tina_ft"), check=_validate, state=TinaState,
                describe=lambda fed: {"prompt": fed.options("tina", TinaOptions).prompt},
                order=10,
                summary="the server generates the head from the client's description; new clients need no label"))
