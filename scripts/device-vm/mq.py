"""Wait for an MQTT message that matches, optionally after publishing one: the VM check's MQTT helper.

    python mq.py TOPIC REGEX SECONDS [PUB_TOPIC PAYLOAD]

Subscribes to TOPIC (retained messages count), then publishes PAYLOAD on PUB_TOPIC if given, and prints the
first payload that matches REGEX; exit 1 with nothing printed after SECONDS. The broker: localhost.
"""

from __future__ import annotations

import re
import sys
import threading

import paho.mqtt.client as mqtt

topic, pattern, seconds = sys.argv[1], re.compile(sys.argv[2]), float(sys.argv[3])
publish = sys.argv[4:6]
found: list[str] = []
subscribed = threading.Event()
done = threading.Event()


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.set()


def on_message(client, userdata, message):
    text = message.payload.decode("utf-8", "replace")
    if not done.is_set() and pattern.search(text):
        found.append(text)
        done.set()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect("localhost", 1883)
client.subscribe(topic, qos=1)
client.loop_start()
if subscribed.wait(10) and publish:
    client.publish(publish[0], publish[1], qos=1).wait_for_publish(10)
done.wait(seconds)
client.loop_stop()
client.disconnect()
if found:
    print(found[0])
sys.exit(0 if found else 1)
