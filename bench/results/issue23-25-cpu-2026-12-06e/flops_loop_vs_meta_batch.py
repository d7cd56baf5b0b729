import sys, time, statistics, torch
sys.path.insert(0, "bench")
torch.set_num_threads(1)
import bench_l2l_vision as B
from torch.utils.flop_counter import FlopCounterMode
for shape in sys.argv[1].split(","):
    spec = B.shapes(32)[shape]
    torch.manual_seed(0)
    state = spec["build"]().state_dict()
    data = B.make_tasks(spec, 16)
    loop = B.Loop("loop", shape, spec, state, data)
    mb = B.MetaBatch("meta_batch", shape, spec, state, data)
    with FlopCounterMode(display=False) as fc:
        loop.optimizer.zero_grad(); loop.meta_iteration()
    flops = fc.get_total_flops()
    for c in (loop, mb): c.step()
    t = {"loop": [], "meta_batch": []}
    for _ in range(5):
        for c in (loop, mb):
            t0 = time.thread_time(); c.step(); t[c.name].append(time.thread_time() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    print(shape, "GFLOP/iter", round(flops / 1e9, 2), {k: (round(v, 1), round(flops / v / 1e6, 1)) for k, v in ms.items()}, "ratio", round(ms["loop"] / ms["meta_batch"], 2))
