import dagster as dg

# Registered by coco_raw: one key per fixed-size group of images, e.g. "train2017-00003".
coco_shards = dg.DynamicPartitionsDefinition(name="coco_shards")
