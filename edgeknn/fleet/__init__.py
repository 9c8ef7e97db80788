"""A fleet on one broker: a device publishes what it was taught as a retained *pack*, and the devices that
follow it load that pack and recognise the same classes.

``pack`` (the manifest and chunks: plain Python), ``client`` (a paho client of the fleet's own, with flow
control for big packs), ``leader`` (publishing a device's pack as it changes), ``follower`` (loading the
followed device's pack, re-embedding it for another model), ``devices`` (`edgeknn devices`: the fleet
seen from its retained messages). An edge like ``mqtt`` and ``web``: it teaches the device only through
commands on the daemon's queue.
"""
