"""A fleet on one broker: a leader's pack (``fleet/pack.py``) published retained in chunks, followers that
load it, and every way a pack can be wrong (half published, damaged, signed with another key, of another
width without pictures, a leader that vanishes). Real daemons on replayed sign digits, a real Mosquitto.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import EXTRACTOR, needs_data
from paho.mqtt.enums import CallbackAPIVersion
from rig import (
    CLASSES,
    Running,
    Scene,
    make_config,
    needs_mosquitto,
    photo_folders,
    stable_on,
    teach,
    wait_for,
)
from test_page import browser  # noqa: F401  (the fixture)

from edgeknn import config
from edgeknn.cli.main import main
from edgeknn.commands import AddExample, RenameClass, Result, Save
from edgeknn.device.build import build
from edgeknn.fleet import pack
from edgeknn.store import archive
from edgeknn.store.knn import fitted_center

# Another model than the rig's (the packaged default): the follower re-embeds the leader's pictures.
OTHER_MODEL = EXTRACTOR


def fleet_config(tmp_path, broker, device: str, model=None, autosave_s=None, rule=None, **fleet):
    folder = tmp_path / device
    folder.mkdir()
    extra: dict = {"model": {"path": str(model), "threads": 2}} if model else {}
    if autosave_s is not None:
        extra["store.autosave_s"] = autosave_s
    if rule is not None:
        extra["store.rule"] = rule
    return make_config(
        folder,
        **extra,
        panel={"kind": "none"},
        mqtt={
            "enabled": True,
            "host": "127.0.0.1",
            "port": broker.port,
            "device_id": device,
            "discovery": False,
        },
        fleet={"debounce_s": 0.2, **fleet},
    )


def submit(run: Running, command_of) -> Result:
    results: list[Result] = []
    run.daemon.submit(command_of(results.append))
    assert wait_for(lambda: results, 60), "no result"
    return results[0]


def raw_client(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)


def a_pack(chunk_bytes: int = 1024) -> tuple[bytes, pack.Manifest]:
    data = np.random.default_rng(0).bytes(5000)
    return data, pack.make("kitchen", io.BytesIO(data), "0" * 64, ["a"], 1, chunk_bytes)


# --- the pack itself ----------------------------------------------------------------------------


def test_a_pack_assembles_from_chunks_in_any_order_and_checks_every_one(tmp_path):
    data, manifest = a_pack()
    assert len(manifest.chunks) == 5 and manifest.size == 5000
    parsed = pack.parse(manifest.to_json())
    assert parsed == manifest
    assembly = pack.Assembly(parsed, tmp_path)
    pieces = [data[i : i + 1024] for i in range(0, 5000, 1024)]
    for i in (4, 0, 2, 1):
        assembly.put(i, pieces[i])
    assert not assembly.complete  # half a pack is never used
    with pytest.raises(pack.PackError, match="chunk 3: not the chunk"):
        assembly.put(3, pieces[2][: len(pieces[3])])
    assembly.put(3, pieces[3])
    assert assembly.complete and assembly.file().read() == data
    assembly.close()


def test_a_manifest_signed_with_another_key_or_altered_is_refused():
    _, manifest = a_pack()
    signed = manifest.to_json("secret")
    assert pack.parse(signed, "secret") == manifest
    with pytest.raises(pack.PackError, match="HMAC"):
        pack.parse(signed, "another")
    with pytest.raises(pack.PackError, match="HMAC"):
        pack.parse(manifest.to_json(), "secret")  # unsigned, where a key is set
    altered = json.loads(signed)
    altered["examples"] = 2
    with pytest.raises(pack.PackError, match="HMAC"):
        pack.parse(json.dumps(altered).encode(), "secret")
    with pytest.raises(pack.PackError, match="size expected"):
        pack.parse(manifest.to_json(), max_bytes=4000)  # fleet.max_pack_mb
    with pytest.raises(pack.PackError, match="not JSON"):
        pack.parse(b"\xff{")


def test_a_manifest_names_the_leaders_centre_and_a_bad_one_is_refused():
    data, _ = a_pack()
    center = np.full(16, 0.2, np.float32)
    manifest = pack.make("kitchen", io.BytesIO(data), "0" * 64, ["a"], 1, 1024, center=(center, 300))
    parsed = pack.parse(manifest.to_json("k"), "k")
    assert np.array_equal(np.frombuffer(parsed.center, "<f4"), center) and parsed.seen == 300
    assert parsed.sha256 == pack.make("kitchen", io.BytesIO(data), "0" * 64, ["a"], 1, 1024).sha256
    body = json.loads(manifest.to_json())
    for field, value, why in [
        ("center", "not base64!", "not base64"),
        ("center", base64.b64encode(b"abc").decode(), "finite float32"),
        ("center", base64.b64encode(np.full(4, np.nan, "<f4").tobytes()).decode(), "finite float32"),
        ("center", base64.b64encode(np.ones(4, "<f4").tobytes()).decode(), "longer than a mean"),
        ("seen", 0, "seen a count"),
    ]:
        with pytest.raises(pack.PackError, match=why):
            pack.parse(json.dumps({**body, field: value}).encode())


# --- real daemons ---------------------------------------------------------------------------------


@needs_data
@needs_mosquitto
def test_followers_learn_what_the_leader_is_taught_and_refuse_teaching(tmp_path, broker, capsys):
    photos = photo_folders(tmp_path)
    scene = Scene(photos)
    leader = Running(build(fleet_config(tmp_path, broker, "kitchen", publish=True), opener=scene.opener))
    scenes = {"same": Scene(photos), "other": Scene(photos)}
    same = fleet_config(tmp_path, broker, "hall", follow="kitchen")
    other = fleet_config(tmp_path, broker, "porch", model=OTHER_MODEL, follow="kitchen")
    followers = {
        "same": Running(build(same, opener=scenes["same"].opener)),
        "other": Running(build(other, opener=scenes["other"].opener)),
    }
    try:
        teach(leader, scene, per_class=5)
        want = leader.daemon.store.counts()
        for name, run in followers.items():
            assert wait_for(lambda r=run: r.daemon.store.counts() == want, 90), (
                name,
                run.daemon.store.counts(),
            )
        # the same classes, predicted alike on the same photos
        for name, run in followers.items():
            for shown in CLASSES:
                scenes[name].shown = shown
                assert stable_on(run, shown, 30), (name, shown, run.recorder.readings[-1].label)
        # teaching a follower is refused, naming its leader
        refused = submit(followers["same"], lambda r: AddExample(class_name="1", source="test", reply=r))
        assert not refused.ok and "teach kitchen instead" in refused.error
        # a change on the leader reaches the followers
        renamed = submit(
            leader, lambda r: RenameClass(class_name="5", new_name="fist", source="test", reply=r)
        )
        assert renamed.ok, renamed
        for run in followers.values():
            assert wait_for(lambda r=run: "fist" in r.daemon.store.classes, 30), run.daemon.store.classes
        state = followers["same"].daemon.state()["fleet"]
        assert state["following"] == "kitchen" and state["pack"] and state["error"] == ""
        assert wait_for(lambda: sorted(leader.daemon.state()["fleet"]["followers"]) == ["hall", "porch"], 30)
        # `edgeknn devices` sees the three, who follows whom, from the broker's retained messages
        capsys.readouterr()
        assert main(["devices", "--broker", f"127.0.0.1:{broker.port}", "--json", "--wait", "1.5"]) == 0
        seen = {d["device"]: d for d in map(json.loads, capsys.readouterr().out.splitlines())}
        assert sorted(seen) == ["hall", "kitchen", "porch"], seen
        assert seen["hall"]["following"] == "kitchen" and seen["kitchen"]["followers"] == ["hall", "porch"]
        assert all(d["online"] and d["classes"] == ["1", "2", "fist"] for d in seen.values()), seen
    finally:
        for run in [leader, *followers.values()]:
            run.stop()


@needs_data
@needs_mosquitto
def test_a_follower_on_the_leaders_model_measures_in_the_leaders_space(tmp_path, broker, subscriber):
    """The default rule's head and unknown threshold are fitted in a space centred on the frames the
    device has seen. The pack names the leader's centre: a follower on its model takes it (the same
    head and threshold as the leader's for the same examples); one on another model keeps its own."""
    photos = photo_folders(tmp_path)
    scene = Scene(photos)
    followers = {
        "hall": fleet_config(tmp_path, broker, "hall", rule="default", follow="kitchen"),
        "porch": fleet_config(tmp_path, broker, "porch", OTHER_MODEL, rule="default", follow="kitchen"),
    }
    runs = {name: Running(build(cfg, opener=Scene(photos).opener)) for name, cfg in followers.items()}
    leader = runs["kitchen"] = Running(
        build(fleet_config(tmp_path, broker, "kitchen", rule="default", publish=True), opener=scene.opener)
    )
    try:
        teach(leader, scene, per_class=3)
        want = leader.daemon.store.counts()
        for name in followers:
            assert wait_for(lambda r=runs[name]: r.daemon.store.counts() == want, 90), name
        # on the leader's model, the follower measures in the leader's space: the centre the pack names
        topic = "edgeknn/kitchen/fleet/manifest"
        manifest = pack.parse(subscriber(broker.port, [topic]).wait_for(lambda m: m.retain, 10).payload)
        center = np.frombuffer(manifest.center, "<f4")
        assert center.size == leader.daemon.store.dim and manifest.seen > 0

        def fitted(run: Running) -> np.ndarray | None:
            got = fitted_center(run.daemon.store)  # read beside the loop: a reference, then a copy
            return None if got is None else got[0]

        def apart(run: Running) -> float:
            got = fitted(run)
            return np.inf if got is None or got.size != center.size else float(np.linalg.norm(got - center))

        # its refit comes a frame or two after it took the centre, which those frames moved a little
        # (0.003 here; a follower with its own centre was 0.17 away)
        assert wait_for(lambda: apart(runs["hall"]) < 0.05, 30), apart(runs["hall"])
        other = fitted(runs["porch"])
        assert other is not None and other.size != center.size  # its own model's centre, its own frames
    finally:
        for run in runs.values():
            run.stop()


@needs_mosquitto
def test_a_follower_keeps_its_last_good_pack_whatever_comes_next(tmp_path, broker, caplog):
    photos = photo_folders(tmp_path)
    scene = Scene(photos)
    leader = Running(build(fleet_config(tmp_path, broker, "kitchen", publish=True), opener=scene.opener))
    follower = Running(
        build(fleet_config(tmp_path, broker, "hall", follow="kitchen"), opener=Scene(photos).opener)
    )
    raw = raw_client(broker.port)
    try:
        teach(leader, scene, per_class=3)
        want = leader.daemon.store.counts()
        assert wait_for(lambda: follower.daemon.store.counts() == want, 90)
        leader.stop()  # the leader vanishes: the follower keeps working with what it has
        assert wait_for(lambda: follower.daemon.state()["fleet"]["leader_online"] is False, 30)
        assert follower.daemon.store.counts() == want
        base = "edgeknn/kitchen/fleet"

        def refused(why: str) -> bool:
            return wait_for(lambda: why in follower.daemon.state()["fleet"]["error"], 30)

        # half a pack: a manifest whose chunks never all come
        data, manifest = a_pack()
        publish(raw, f"{base}/pack/{manifest.version}/0", data[:1024])
        publish(raw, f"{base}/manifest", manifest.to_json())
        time.sleep(2)
        assert follower.daemon.store.counts() == want and follower.daemon.state()["fleet"]["error"] == ""
        # a damaged chunk
        publish(raw, f"{base}/pack/{manifest.version}/1", data[:1024])
        assert refused("chunk 1: not the chunk")
        # a pack of another width without pictures: refused whole
        rows = archive.Example(
            archive.Entry(1, "ghost", 1e9, 1, None), np.ones((1, 8), np.float32), None, None
        )
        out = io.BytesIO()
        archive.write(out, archive.Manifest("f" * 64, 8, "float32", ["ghost"], [rows.entry]),
                      [(rows.values.astype("<f4").tobytes(), None)])  # fmt: skip
        ghost = pack.make("kitchen", io.BytesIO(out.getvalue()), "f" * 64, ["ghost"], 1)
        for index, chunk in pack.chunks_of(io.BytesIO(out.getvalue()), ghost):
            publish(raw, f"{base}/pack/{ghost.version}/{index}", chunk)
        publish(raw, f"{base}/manifest", ghost.to_json())
        assert refused("no picture to re-embed")
        assert follower.daemon.store.counts() == want
    finally:
        raw.loop_stop()
        follower.stop()
        if leader.thread.is_alive():
            leader.stop()


@needs_data
@needs_mosquitto
def test_a_follower_names_its_pack_only_once_the_store_holding_it_is_saved(tmp_path, broker):
    """fleet-follow.json says which pack the saved store holds. A power cut between a pack's swap and the
    save that has it (copied here: the state folder as the cut leaves it) must not leave a follower that
    believes it has the new pack while its store file holds the old one: it loads the new one again."""
    photos = photo_folders(tmp_path)
    scene = Scene(photos)
    leader = Running(build(fleet_config(tmp_path, broker, "kitchen", publish=True), opener=scene.opener))
    follower = Running(
        build(
            fleet_config(tmp_path, broker, "hall", autosave_s=3600, follow="kitchen"),
            opener=Scene(photos).opener,
        )
    )
    record = tmp_path / "hall" / "fleet-follow.json"
    again = None

    def recorded() -> str:
        return json.loads(record.read_text())["sha256"][:16]

    def loaded() -> str:
        return follower.daemon.state()["fleet"]["pack"]  # set just after the loop swapped it in

    try:
        teach(leader, scene, per_class=2)
        first = leader.daemon.store.counts()
        assert wait_for(lambda: follower.daemon.store.counts() == first and loaded(), 90)
        assert not record.exists()  # swapped in, not saved yet
        assert submit(follower, lambda r: Save(source="test", reply=r)).ok
        saved = recorded()
        assert saved == loaded()
        renamed = submit(
            leader, lambda r: RenameClass(class_name="5", new_name="fist", source="test", reply=r)
        )
        assert renamed.ok, renamed
        assert wait_for(lambda: "fist" in follower.daemon.store.classes and loaded() != saved, 30)
        assert recorded() == saved  # still the saved store's pack
        newer = loaded()
        (tmp_path / "cut").mkdir()
        cut = fleet_config(tmp_path / "cut", broker, "hall", autosave_s=3600, follow="kitchen")
        for name in ("store.npz", "fleet-follow.json"):
            (tmp_path / "cut" / "hall" / name).write_bytes((tmp_path / "hall" / name).read_bytes())
        shutil.copytree(
            tmp_path / "hall" / "store.npz.pictures", tmp_path / "cut" / "hall" / "store.npz.pictures"
        )
        follower.stop()
        again = Running(build(cut, opener=Scene(photos).opener))
        assert "5" in again.daemon.store.classes  # the saved store, from before the rename
        assert wait_for(lambda: "fist" in again.daemon.store.classes, 60), again.daemon.store.classes
        assert wait_for(lambda: again.daemon.state()["fleet"]["pack"] == newer, 30)
    finally:
        for run in (leader, follower, again):
            if run is not None and run.thread.is_alive():
                run.stop()


@needs_mosquitto
def test_a_follower_with_a_key_refuses_an_unsigned_pack(tmp_path, broker):
    photos = photo_folders(tmp_path)
    scene = Scene(photos)
    leader = Running(build(fleet_config(tmp_path, broker, "kitchen", publish=True), opener=scene.opener))
    cfg = fleet_config(tmp_path, broker, "hall", follow="kitchen", key="shared secret")
    follower = Running(build(cfg, opener=Scene(photos).opener))
    try:
        teach(leader, scene, per_class=2)
        assert wait_for(lambda: "HMAC" in follower.daemon.state()["fleet"]["error"], 60)
        assert sum(follower.daemon.store.counts().values()) == 0
    finally:
        follower.stop()
        leader.stop()


@needs_mosquitto
def test_a_broker_that_lost_everything_gets_the_pack_again_and_a_stalled_pack_is_given_up(
    tmp_path, broker, monkeypatch
):
    from edgeknn.fleet import follower as follower_module

    monkeypatch.setattr(follower_module, "STALL_S", 2.0)
    photos = photo_folders(tmp_path)
    scene = Scene(photos)
    leader = Running(build(fleet_config(tmp_path, broker, "kitchen", publish=True), opener=scene.opener))
    hall = fleet_config(tmp_path, broker, "hall", follow="kitchen")
    follower = Running(build(hall, opener=Scene(photos).opener))
    raw = None
    try:
        teach(leader, scene, per_class=2)
        want = leader.daemon.store.counts()
        assert wait_for(lambda: follower.daemon.store.counts() == want, 90)
        # the broker restarts with nothing retained (no persistence): the leader publishes its pack again
        broker.kill()
        broker.restart()
        raw = raw_client(broker.port)
        manifests: list[bytes] = []
        raw.on_message = lambda c, u, m: manifests.append(m.payload)
        raw.subscribe("edgeknn/kitchen/fleet/manifest", qos=1)
        assert wait_for(lambda: manifests and manifests[-1], 60), "the leader did not republish its pack"
        assert pack.parse(manifests[-1]).examples == sum(want.values())
        # a manifest whose chunks stop coming is given up after STALL_S, and the last good pack stays
        data, manifest = a_pack()
        publish(raw, f"edgeknn/kitchen/fleet/pack/{manifest.version}/0", data[:1024])
        publish(raw, "edgeknn/kitchen/fleet/manifest", manifest.to_json())
        assert wait_for(lambda: "1 of 5 chunks came" in follower.daemon.state()["fleet"]["error"], 30)
        assert follower.daemon.store.counts() == want
    finally:
        if raw is not None:
            raw.loop_stop()
        follower.stop()
        leader.stop()


@needs_mosquitto
def test_the_page_of_a_follower_names_its_leader_and_the_leaders_its_followers(tmp_path, broker, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from test_page import logged_in
    from test_web import PASSWORD, free_port

    photos = photo_folders(tmp_path)
    pages = {"kitchen": free_port(), "hall": free_port()}

    def device(name: str, **fleet) -> Running:
        cfg = fleet_config(tmp_path, broker, name, **fleet)
        web = {"enabled": True, "listen": "127.0.0.1", "port": pages[name], "password": PASSWORD}
        cfg = config.from_dict({**config.to_dict(cfg), "web": web})
        return Running(build(cfg, opener=Scene(photos).opener))

    leader, follower = device("kitchen", publish=True), device("hall", follow="kitchen")
    try:
        line = lambda: browser.find_element(By.ID, "fleet").text  # noqa: E731
        logged_in(browser, pages["hall"])
        assert wait_for(lambda: "Following kitchen" in line(), 30), line()
        logged_in(browser, pages["kitchen"])
        assert wait_for(lambda: "Followed by hall" in line(), 60), line()
    finally:
        follower.stop()
        leader.stop()
