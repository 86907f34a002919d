"""Mapillary Vistas v1.2 semantic classes, in the order of the Mask2Former Vistas checkpoints.

The synthetic dataset writes its perspective ground truth as indices into ``VISTAS_CLASSES``;
pseudo-labelling maps *names* (never indices) to our classes, so a checkpoint whose
``id2label`` orders classes differently still maps correctly.
"""

VISTAS_CLASSES: tuple[str, ...] = (
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane",
    "Crosswalk - Plain", "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road",
    "Service Lane", "Sidewalk", "Bridge", "Building", "Tunnel", "Person", "Bicyclist",
    "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk", "Lane Marking - General",
    "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box",
    "Mailbox", "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame",
    "Utility Pole", "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can",
    "Bicycle", "Boat", "Bus", "Car", "Caravan", "Motorcycle", "On Rails", "Other Vehicle",
    "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle",
)  # fmt: skip

VISTAS_ID: dict[str, int] = {name: i for i, name in enumerate(VISTAS_CLASSES)}
assert len(VISTAS_CLASSES) == 65
