"""``python -m vllm_utio.cpu_ops``: build UTIO's CPU ops now (set-up does, once)."""

from vllm_utio.cpu_ops import build_name, load

if __name__ == "__main__":
    load()
    print(f"[ops] {build_name()} ready")
