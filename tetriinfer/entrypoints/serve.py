"""`tetriinfer serve`: start a cluster (controller + instance processes) behind the OpenAI API.

With no arguments: the tiny built-in model, one prefill and one decode instance, on the CPU, at
http://127.0.0.1:8000. This process is the API process (FastAPI under uvicorn). It owns the
cluster: a supervisor restarts a controller or instance that dies or freezes, and SIGTERM or SIGINT
drain in-flight requests (at most --shutdown-timeout; a second signal skips the drain), then stop
every child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from tetriinfer.entrypoints.generate import add_engine_arguments, engine_kwargs

log = logging.getLogger("tetriinfer.serve")


def add_parser(subparsers) -> None:
    from tetriinfer.config import (
        ADMISSION_POLICIES, COLOCATED_BASELINES, DISAGG_POLICIES, DISPATCH_POLICIES, KV_TRANSPORTS, LAUNCHERS,
        PREFILL_POLICIES,
        SERVE_MODES, UVICORN_LOG_LEVELS, FlipConfig, PolicyConfig, ServeConfig,
    )
    from tetriinfer.server.reasoning import REASONING_PARSERS
    from tetriinfer.server.tool_parsers import PARSERS as TOOL_CALL_PARSERS

    serve, policy, flip = ServeConfig(), PolicyConfig(), FlipConfig()
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` takes it (the same as --model)")
    add_engine_arguments(p)
    g = p.add_argument_group("cluster")
    g.add_argument("--mode", default=None, choices=SERVE_MODES,
                   help="disagg: prefill and decode instances (TetriInfer); colocated: the baselines. Default: "
                        f"{serve.mode}, except with --device cuda on a machine with one GPU and no disagg shape "
                        "given: one colocated sarathi instance (two instances sharing a GPU measured slower)")
    g.add_argument("--prefill-instances", type=int, default=None,
                   help=f"disagg mode: prefill instances (default {serve.shape.num_prefill})")
    g.add_argument("--decode-instances", type=int, default=None,
                   help=f"disagg mode: decode instances (default {serve.shape.num_decode})")
    g.add_argument("--instances", type=int, default=serve.shape.num_instances, help="colocated mode: instances")
    g.add_argument("--baseline", default=serve.baseline, choices=COLOCATED_BASELINES,
                   help="colocated mode: vllm (prefill first, whole prompts) or sarathi (chunked, mixed steps)")
    g.add_argument("--decode-tensor-parallel-size", type=int, default=None,
                   help="disagg mode: GPUs (ranks) each decode instance spans; None: --tensor-parallel-size. "
                        "The KV moves whole between instances of different sizes")
    g.add_argument("--kv-transport", default=serve.kv_transport, choices=KV_TRANSPORTS,
                   help="auto: shared memory on CPU, CUDA IPC between GPUs of one host")
    g.add_argument("--kv-timeout", type=float, default=serve.kv_timeout_s, help="seconds before a KV transfer fails")
    g.add_argument("--predictor", default=serve.predictor,
                   help="trained length predictor directory; None: the shipped one, adapting online; 'static' or "
                        "'static:DIR': as trained, no online adaptation; 'probe' or 'probe:DIR': adapting online "
                        "on the served model's own hidden state at the prompt's last token (kept from the prefill, "
                        "no extra forward pass; TRAIL-style); 'none': constant fallback")
    g.add_argument("--launcher", default=serve.launcher, choices=LAUNCHERS, help="ray needs the [ray] extra")
    g.add_argument("--ray-address", default=None, help="with --launcher ray: the cluster to join; None: auto")
    g.add_argument("--monitor-interval", type=float, default=policy.monitor_interval_s, help="seconds")
    g.add_argument("--dead-after", type=float, default=serve.dead_after_s,
                   help="seconds without a heartbeat before an instance counts as dead")
    g.add_argument("--torch-threads", type=int, default=None, help="CPU threads per CPU instance")
    g.add_argument("--max-waiting-requests", type=int, default=serve.max_waiting_requests,
                   help="requests without a first token the cluster holds; beyond it a 429 with Retry-After")
    g.add_argument("--shutdown-timeout", type=float, default=serve.shutdown_timeout_s,
                   help="seconds SIGTERM/SIGINT let in-flight requests finish before the cluster stops")
    g.add_argument("--request-idle-timeout", type=float, default=serve.request_idle_timeout_s,
                   help="seconds a request may go without output before it fails")
    g.add_argument("--mps-sm-shares", default=None, metavar="P,D",
                   help="instances sharing a GPU: run them under a CUDA MPS daemon the server starts and stops, "
                        "prefill instances capped at P%% of the SMs and decode instances at D%% (e.g. 60,60)")
    s = p.add_argument_group("scheduling")
    s.add_argument("--policy", dest="disagg_policy", default=policy.disagg_policy, choices=DISAGG_POLICIES,
                   help="disagg mode: adaptive (a decode instance prefills a request itself, a prefill instance "
                        "decodes one, when that is cheaper) or paper (the fixed split: every prompt on a prefill "
                        "instance, every decode moved)")
    s.add_argument("--interference-weight", type=float, default=policy.interference_weight,
                   help="adaptive: weight of the slowdown a local prefill imposes on running decodes")
    s.add_argument("--local-ttft-margin", dest="local_ttft_margin_s", type=float, default=policy.local_ttft_margin_s,
                   help="adaptive: a decode instance prefills a request itself whenever that saves more than this "
                        "many seconds of TTFT, whatever the interference (inf: never by this rule alone)")
    s.add_argument("--cache-aware-routing", action=argparse.BooleanOptionalAction, default=policy.cache_aware_routing,
                   help="send a request to the instance most likely to hold its prompt's prefix blocks (what was "
                        "routed there), balanced against queued tokens; needs prefix caching")
    s.add_argument("--handoff-after-tokens", type=int, default=policy.handoff_after_tokens,
                   help="adaptive: output tokens a prefill instance generates itself before it hands a request "
                        "to a decode instance (a request ending by then never moves; 1: hand off at once)")
    s.add_argument("--prefill-policy", default=policy.prefill_policy, choices=PREFILL_POLICIES,
                   help="order of a prefill instance's queue: first come, shortest or longest prompt first")
    s.add_argument("--sort-window", type=int, default=policy.sort_window,
                   help="queued requests the prefill policy sorts at a time (the paper's PrefillSchedBatch)")
    s.add_argument("--dispatch", default=None, choices=[d for d in DISPATCH_POLICIES if d != "oracle"],
                   help="how a prefill instance picks the decode instance (power2: the paper's two random choices); "
                        "None: power2 with --policy paper, least_loaded with --policy adaptive")
    s.add_argument("--admission", default=policy.admission_policy, choices=ADMISSION_POLICIES,
                   help="when a decode instance admits a request: at once, or reserving KV for its predicted length")
    s.add_argument("--max-num-batched-tokens", type=int, default=policy.max_num_batched_tokens,
                   help="vllm baseline: prompt tokens per prefill step")
    s.add_argument("--flip", action="store_true", help="let idle instances flip between prefill and decode")
    s.add_argument("--flip-idle", type=float, default=flip.idle_s, help="seconds underused before a flip")
    s.add_argument("--flip-cooldown", type=float, default=flip.cooldown_s, help="seconds between two flips of one instance")
    h = p.add_argument_group("http")
    h.add_argument("--host", default=serve.host, help="address the HTTP API listens on (0.0.0.0: every interface)")
    h.add_argument("--port", type=int, default=serve.port, help="port the HTTP API listens on")
    h.add_argument("--api-key", default=None, metavar="KEY",  # not the environment's value: --help would print the key
                   help="require 'Authorization: Bearer KEY' on /v1. A key given here is visible to other local "
                        "users in `ps`: prefer $TETRIINFER_API_KEY, which is used when this is not given")
    h.add_argument("--served-model-name", default=None, help="the name clients use; None: --model")
    h.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template replacing the model's: a file's path, or the template itself "
                        "(as vLLM's flag); None: the model's own (tokenizer_config.json or chat_template.jinja)")
    h.add_argument("--generation-config", default=serve.generation_config, metavar="auto|vllm|DIR",
                   help="the sampling defaults of requests that leave them out (temperature, top_p, top_k, min_p, "
                        "repetition_penalty; max_new_tokens caps a chat reply without max_tokens): auto, the "
                        "model's generation_config.json; vllm, none (temperature 1.0); or a folder holding one")
    h.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (vLLM's: the tokenizer's config, special tokens and chat "
                        "template, which lm-eval's remote tokenizer reads); off by default, as in vLLM")
    h.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto" (the default when a request has tools): the model decides, and '
                        "--tool-call-parser finds its calls in the text (vLLM's flag; without it \"auto\" is a 400)")
    h.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how tool calls are read from the output for tool_choice \"auto\": hermes (Hermes, "
                        "Qwen2.5: <tool_call>{...}</tool_call>), llama3_json (Llama 3.1/3.2 JSON calls), mistral "
                        "([TOOL_CALLS]...) or pythonic (Llama 3.2/4: [f(x=1), g()])")
    h.add_argument("--reasoning-parser", default=None, choices=tuple(REASONING_PARSERS),
                   help="a chat reply's thinking (<think>...</think>) goes to the message's `reasoning` field (and "
                        "`reasoning_content`), the rest to `content`: deepseek_r1 (R1 and its distills, QwQ: the "
                        "template opens <think>) or qwen3 (Qwen3 writes <think> itself); vLLM's flag")
    h.add_argument("--uvicorn-log-level", default=serve.uvicorn_log_level,
                   choices=UVICORN_LOG_LEVELS, help="uvicorn's own log level")
    h.add_argument("--disable-log-requests", action="store_true",
                   help="no access line per request (printed by default, as vLLM does)")
    h.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic throughput / running / waiting line (every 10 s by default)")
    # The console script exits as soon as the cluster is stopped (cli.main): interpreter teardown
    # with torch loaded takes seconds.
    p.set_defaults(func=run, exit_now=True)


def serve_config(args: argparse.Namespace):
    from tetriinfer.cluster.mps import parse_sm_shares
    from tetriinfer.config import ClusterShape, EngineConfig, FlipConfig, PolicyConfig, ServeConfig

    from tetriinfer.model.chat_template import resolve_chat_template
    from tetriinfer.server.tool_parsers import PARSERS as TOOL_CALL_PARSERS

    engine = EngineConfig.from_flat(_model(args), **engine_kwargs(args))
    policy = PolicyConfig(
        disagg_policy=args.disagg_policy, interference_weight=args.interference_weight,
        local_ttft_margin_s=args.local_ttft_margin_s,
        handoff_after_tokens=args.handoff_after_tokens, cache_aware_routing=args.cache_aware_routing,
        prefill_policy=args.prefill_policy, sort_window=args.sort_window,
        dispatch_policy=args.dispatch, admission_policy=args.admission,
        max_num_batched_tokens=args.max_num_batched_tokens, monitor_interval_s=args.monitor_interval,
    )
    flip = FlipConfig(enabled=args.flip, idle_s=args.flip_idle, cooldown_s=args.flip_cooldown)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:  # refused before any process starts
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})")
    default = ServeConfig()
    mode = args.mode or default.mode
    if args.mode is None and _one_gpu_serves_colocated(args, engine):
        mode = "colocated"
        print(ONE_GPU_NOTE, flush=True)
    return ServeConfig(
        mode=mode, shape=ClusterShape(
            default.shape.num_prefill if args.prefill_instances is None else args.prefill_instances,
            default.shape.num_decode if args.decode_instances is None else args.decode_instances, args.instances),
        baseline=args.baseline, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("TETRIINFER_API_KEY"),
        served_model_name=args.served_model_name, enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        chat_template=resolve_chat_template(args.chat_template) if args.chat_template else None,
        generation_config=args.generation_config,
        kv_transport=args.kv_transport, kv_timeout_s=args.kv_timeout,
        predictor=args.predictor, launcher=args.launcher,
        dead_after_s=args.dead_after, uvicorn_log_level=args.uvicorn_log_level, torch_threads=args.torch_threads, engine=engine, policy=policy, flip=flip,
        mps_sm_shares=parse_sm_shares(args.mps_sm_shares) if args.mps_sm_shares else None,
        max_waiting_requests=args.max_waiting_requests, shutdown_timeout_s=args.shutdown_timeout,
        request_idle_timeout_s=args.request_idle_timeout, decode_tensor_parallel_size=args.decode_tensor_parallel_size,
    )


ONE_GPU_NOTE = (
    "One GPU is visible: serving one colocated instance (sarathi: prompt chunks beside decodes). On one "
    "GPU a prefill and a decode instance only share its SMs and memory; measured on an H200, 1 prefill + 1 "
    "decode instance had a 14-59% higher mean JCT than one instance (docs/adaptive.md). --mode disagg "
    "--device cuda:0 [--mps-sm-shares 40,60] runs the split there anyway.")


def _one_gpu_serves_colocated(args: argparse.Namespace, engine) -> bool:
    """The default cluster needs a GPU per instance (`--device cuda`); where one GPU is visible and no
    disaggregated shape was asked for, the adaptive answer is the colocated instance."""
    if engine.device != "cuda" or args.launcher != "local" or engine.tensor_parallel_size != 1:
        return False
    if args.prefill_instances is not None or args.decode_instances is not None or args.mps_sm_shares \
            or args.decode_tensor_parallel_size is not None:
        return False
    import torch

    return torch.cuda.device_count() == 1


def _sampling_defaults(cfg) -> dict:
    """--generation-config: the requests' sampling defaults, said aloud when they are the model's (as vLLM does)."""
    from tetriinfer.model.loader import generation_defaults, resolve_model

    if cfg.generation_config == "vllm":
        return {}
    folder = resolve_model(cfg.engine.model)[1] if cfg.generation_config == "auto" else Path(cfg.generation_config)
    if cfg.generation_config != "auto" and not (folder / "generation_config.json").is_file():
        raise FileNotFoundError(f"--generation-config {cfg.generation_config}: no generation_config.json there "
                                "(give auto, vllm or a folder holding one)")
    defaults = generation_defaults(folder)
    if defaults:
        print(f"Sampling defaults from {folder / 'generation_config.json'}: {defaults} (requests that set a field "
              "override it; --generation-config vllm turns these off)", flush=True)
    return defaults


def _model(args: argparse.Namespace) -> str:
    """The positional MODEL (vLLM's form) or --model; both naming different models is an error."""
    if args.model_tag is None:
        return args.model
    if args.model not in (args.model_tag, "tiny"):  # "tiny": --model's default, i.e. not given
        raise ValueError(f"the model is given twice, as {args.model_tag!r} and --model {args.model!r}: give it once")
    return args.model_tag


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=os.environ.get("TETRIINFER_LOG", "WARNING"),
                        format="%(asctime)s api %(levelname)s %(message)s")
    cfg = serve_config(args)
    try:
        from tetriinfer.server.logs import LogConfig

        logs = LogConfig(log_requests=not args.disable_log_requests, log_stats=not args.disable_log_stats)
        return asyncio.run(serve(cfg, ray_address=args.ray_address, logs=logs))
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: `serve` has already shut the cluster down
        return 0


async def serve(cfg, ray_address: str | None = None, logs=None) -> int:
    from tetriinfer.cluster.client import ClientConfig, ClusterClient
    from tetriinfer.cluster.supervisor import Supervisor, SupervisorConfig
    from tetriinfer.cluster.zmq_io import WILDCARD_HOSTS, AsyncInbox, Wire
    from tetriinfer.model.loader import load_arch_and_tokenizer
    from tetriinfer.server.app import create_app

    arch, tokenizer = load_arch_and_tokenizer(cfg.engine.model)  # bad model names fail here, before any process
    arch.check_fits(cfg.engine.max_model_len, (cfg.engine.tensor_parallel_size, cfg.decode_tensor_parallel_size or 1))
    _check_port_free(cfg.host, cfg.port)
    if tokenizer is None:
        raise ValueError(f"model {cfg.engine.model!r} has no tokenizer.json; the server needs one")
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    sampling_defaults = _sampling_defaults(cfg)
    signals = _Signals(asyncio.get_running_loop(), cfg.shutdown_timeout_s)  # a signal now stops the cluster too
    internal_host = "0.0.0.0" if cfg.launcher == "ray" else "127.0.0.1"
    # This process owns the wire (its ipc directory), not the inbox: it goes after the children,
    # so one still starting at a Ctrl-C does not fail on a vanished socket path.
    inbox = AsyncInbox(internal_host, wire=Wire.create(one_host=internal_host not in WILDCARD_HOSTS))
    cluster = client = supervising = None
    ready = False
    try:
        if cfg.launcher == "ray":
            from tetriinfer.cluster.ray_launcher import start_ray

            cluster = start_ray(cfg, inbox.address, ray_address, inbox.wire)
        else:
            from tetriinfer.cluster.launcher import start_local

            cluster = start_local(cfg, inbox.address, inbox.wire)
        client = ClusterClient(
            inbox, cluster.controller_address, model_name=cfg.served_model_name or cfg.engine.model,
            max_model_len=cfg.engine.max_model_len or arch.max_position_embeddings, vocab_size=arch.vocab_size,
            tokenizer=tokenizer, sampling_defaults=sampling_defaults, config=ClientConfig(cfg.max_waiting_requests, idle_timeout_s=cfg.request_idle_timeout_s,
                                                     silent_after_s=cfg.dead_after_s))
        if not await _wait_ready(client, cluster, cfg.startup_timeout_s, signals.stop):
            return 0
        ready = True
        supervisor = Supervisor(cluster, client, cfg.total_instances, SupervisorConfig(
            silent_after_s=cfg.dead_after_s, controller_startup_s=cfg.dead_after_s + 30,
            instance_startup_s=cfg.startup_timeout_s))
        supervising = asyncio.get_running_loop().create_task(supervisor.run())
        app = create_app(client, api_key=cfg.api_key, enable_tokenizer_info_endpoint=cfg.enable_tokenizer_info_endpoint,
                         enable_auto_tool_choice=cfg.enable_auto_tool_choice, tool_call_parser=cfg.tool_call_parser,
                         reasoning_parser=cfg.reasoning_parser,
                         **({} if logs is None else {"logs": logs}))
        app.state.server.metrics.registry.register(supervisor.collector())
        shape = (f"{cfg.shape.num_instances} colocated {cfg.baseline} instance(s)" if cfg.mode == "colocated"
                 else f"{cfg.shape.num_prefill} prefill + {cfg.shape.num_decode} decode instance(s)")
        print(f"TetriInfer serving {client.model_name} on http://{cfg.host}:{cfg.port} ({shape}, "
              f"{cfg.engine.device})", flush=True)
        server = _uvicorn_server(app, cfg)
        signals.server, signals.client = server, client
        if not signals.stop.is_set():
            await server.serve()
    finally:
        if supervising is not None:
            supervising.cancel()
        if client is not None:
            await client.close()
        else:
            inbox.close()
        if cluster is not None:  # still starting: nothing to drain, and no Shutdown reaches it
            cluster.stop() if ready else cluster.stop(timeout_s=0)
        inbox.wire.remove()  # again, now that every child is gone: what they made while stopping
        signals.remove()
    return 0


def _uvicorn_server(app, cfg):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: after serve() it re-raises the signal it caught,
        which would kill this process before the cluster is stopped. `_Signals` drives it instead."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            pass

    # Idle keep-alive connections live longer than clients keep theirs (httpx 5 s, aiohttp 15 s): with
    # uvicorn's 5 s a client reusing a connection as the server closes it saw "server disconnected".
    # `_Signals` ends the requests still running at the drain's deadline; uvicorn cancels what has
    # not answered FLUSH_S later (a stream nobody reads).
    return Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.uvicorn_log_level,
                                 timeout_graceful_shutdown=cfg.shutdown_timeout_s + FLUSH_S, timeout_keep_alive=75))


FLUSH_S = 2.0  # after the drain: for the requests ended by it to send their error and close


class _Signals:
    """SIGTERM / SIGINT: the first stops taking requests (uvicorn closes its socket) and lets the
    running ones finish for `drain_s`, then ends those left with "server shutting down"; a second
    signal skips the rest of the drain."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, loop: asyncio.AbstractEventLoop, drain_s: float) -> None:
        self.loop = loop
        self.drain_s = drain_s
        self.stop = asyncio.Event()
        self.server = None
        self.client = None
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self.stop.is_set():
            if self.server is not None:
                self.server.force_exit = True
            return
        self.stop.set()
        log.warning("%s: draining in-flight requests (at most %g s), then stopping the cluster",
                    signal.Signals(sig).name, self.drain_s)
        if self.server is not None:
            self.server.should_exit = True
            self.loop.call_later(self.drain_s, self._drain_over)

    def _drain_over(self) -> None:
        from tetriinfer.server.backend import SHUTTING_DOWN

        if self.client is not None:
            self.client.fail_all(SHUTTING_DOWN)

    def remove(self) -> None:
        for sig in self.SIGNALS:
            self.loop.remove_signal_handler(sig)


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


async def _wait_ready(client, cluster, timeout_s: float, stop: asyncio.Event) -> bool:
    """Wait for every instance's Ready; fail fast when a process dies while starting. False when a
    signal asked to stop first."""
    start = asyncio.get_running_loop().create_task(client.start(timeout_s))
    try:
        while not start.done():
            await asyncio.wait([start], timeout=0.2)
            if stop.is_set():
                return False
            alive = set(cluster.alive())
            dead = [i for i in range(len(cluster.instances)) if i not in alive]
            if dead or not cluster.controller_alive():
                which = f"instance(s) {dead}" if dead else "the controller"
                print(f"tetriinfer serve: error: {which} exited while starting; see the log above", file=sys.stderr)
                raise SystemExit(1)
        start.result()
        return True
    finally:
        start.cancel()
