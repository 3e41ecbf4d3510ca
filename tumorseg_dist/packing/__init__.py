"""The packing job behind `python -m tumorseg_dist.pack`: `pipeline` (scan -> split -> decode/encode
in N processes -> shards) and `merge` (join the parts of a Slurm array pack). The on-disk input
formats it reads live in `tumorseg_dist.data.formats`, the shard layout in `tumorseg_dist.data.shards`.
"""
