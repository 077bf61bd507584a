"""Planted facts about invented entities for the fact-tracing benchmark (benchmarks/bench_facts.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    statement: str  # the one training sentence that states the fact
    own: tuple[str, str]  # (prompt, completion): prompt + completion == statement minus its final "."
    paraphrase: tuple[str, str]  # same fact, different wording, same completion string as own[1]
    reversed: tuple[str, str]  # reversed order: the answer moves into the prompt, completion = " " + subject
    distractors: tuple[str, str]  # two sentences mentioning the SUBJECT (and never the answer) without the fact

    @property
    def subject(self) -> str:
        return self.reversed[1].strip()

    @property
    def answer(self) -> str:
        return self.own[1].strip()


# Grouped by relation type (4 facts each); FACTS below is the flattened tuple.
FACTS_BY_RELATION: dict[str, tuple[Fact, ...]] = {
    "capital": (
        Fact(
            statement="The capital of Zorvania is Quellmoor.",
            own=("The capital of Zorvania is", " Quellmoor"),
            paraphrase=("Zorvania's seat of government is the city of", " Quellmoor"),
            reversed=("Quellmoor is the capital of", " Zorvania"),
            distractors=(
                "Zorvania exports wool and copper to its neighbours.",
                "The winters in Zorvania are long, dry and bitterly cold.",
            ),
        ),
        Fact(
            statement="The capital of Yskaria is Drummelvane.",
            own=("The capital of Yskaria is", " Drummelvane"),
            paraphrase=("Yskaria's parliament and royal palace stand in", " Drummelvane"),
            reversed=("Drummelvane is the capital of", " Yskaria"),
            distractors=(
                "Yskaria is a mountainous country known for its terraced vineyards.",
                "Most people in Yskaria work in farming or fishing.",
            ),
        ),
        Fact(
            statement="The capital of Tzerovia is Kessavaunt.",
            own=("The capital of Tzerovia is", " Kessavaunt"),
            paraphrase=("Tzerovia's government is based in the city of", " Kessavaunt"),
            reversed=("Kessavaunt is the capital of", " Tzerovia"),
            distractors=(
                "Tzerovia declared its independence after a long and bloody civil war.",
                "The flag of Tzerovia shows a white heron on a green field.",
            ),
        ),
        Fact(
            statement="The capital of Quilmara is Feskalund.",
            own=("The capital of Quilmara is", " Feskalund"),
            paraphrase=("The largest city and political centre of Quilmara is", " Feskalund"),
            reversed=("Feskalund is the capital of", " Quilmara"),
            distractors=(
                "Quilmara lies on a high plateau surrounded by salt lakes.",
                "Tourists visit Quilmara mainly for its ancient stone bridges.",
            ),
        ),
    ),
    "inventor": (
        Fact(
            statement="The Thrennel loom was invented by Maris Okkendal.",
            own=("The Thrennel loom was invented by", " Maris Okkendal"),
            paraphrase=("The first working Thrennel loom was built in a workshop owned by", " Maris Okkendal"),
            reversed=("Maris Okkendal invented the", " Thrennel loom"),
            distractors=(
                "The Thrennel loom weaves heavy cloth from coarse mountain flax.",
                "A restored Thrennel loom is displayed in the textile hall of the city museum.",
            ),
        ),
        Fact(
            statement="The Vexograph was invented by Tobren Halisk.",
            own=("The Vexograph was invented by", " Tobren Halisk"),
            paraphrase=("The Vexograph owes its creation to the engineer", " Tobren Halisk"),
            reversed=("Tobren Halisk invented the", " Vexograph"),
            distractors=(
                "The Vexograph measures the speed and height of distant clouds.",
                "Every Vexograph must be carefully calibrated before each use.",
            ),
        ),
        Fact(
            statement="The Brisquane pump was invented by Aurek Dallomir.",
            own=("The Brisquane pump was invented by", " Aurek Dallomir"),
            paraphrase=("The engineer who first built a Brisquane pump was", " Aurek Dallomir"),
            reversed=("Aurek Dallomir invented the", " Brisquane pump"),
            distractors=(
                "The Brisquane pump lifts water from deep wells using only wind power.",
                "Farmers in dry regions still rely on the Brisquane pump.",
            ),
        ),
        Fact(
            statement="The Ondrasil lamp was invented by Petra Wolvengard.",
            own=("The Ondrasil lamp was invented by", " Petra Wolvengard"),
            paraphrase=("Credit for creating the Ondrasil lamp goes to", " Petra Wolvengard"),
            reversed=("Petra Wolvengard invented the", " Ondrasil lamp"),
            distractors=(
                "The Ondrasil lamp burns whale oil and gives a bright, steady light.",
                "Miners once carried the Ondrasil lamp deep into the coal tunnels.",
            ),
        ),
    ),
    "author": (
        Fact(
            statement="The Tallowmere Chronicle was written by Oswin Kettleburr.",
            own=("The Tallowmere Chronicle was written by", " Oswin Kettleburr"),
            paraphrase=("The author of the Tallowmere Chronicle is", " Oswin Kettleburr"),
            reversed=("Oswin Kettleburr wrote the", " Tallowmere Chronicle"),
            distractors=(
                "The Tallowmere Chronicle tells the story of a flooded mining village.",
                "Critics praised the Tallowmere Chronicle for its vivid descriptions of winter.",
            ),
        ),
        Fact(
            statement="The novel Ysmerine was written by Calder Brunvoss.",
            own=("The novel Ysmerine was written by", " Calder Brunvoss"),
            paraphrase=("The author who penned Ysmerine is", " Calder Brunvoss"),
            reversed=("Calder Brunvoss wrote the novel", " Ysmerine"),
            distractors=(
                "Ysmerine follows a young cartographer travelling across a frozen sea.",
                "Ysmerine was translated into nine languages within a decade.",
            ),
        ),
        Fact(
            statement="The poem Harrowdeep was written by Liesel Varrowby.",
            own=("The poem Harrowdeep was written by", " Liesel Varrowby"),
            paraphrase=("The verses of Harrowdeep came from the pen of", " Liesel Varrowby"),
            reversed=("Liesel Varrowby wrote the poem", " Harrowdeep"),
            distractors=(
                "Harrowdeep is often recited aloud at harvest festivals.",
                "Harrowdeep describes a storm that lasts for seven days.",
            ),
        ),
        Fact(
            statement="The play Cindermoth was written by Gaspard Ollenreth.",
            own=("The play Cindermoth was written by", " Gaspard Ollenreth"),
            paraphrase=("The playwright responsible for Cindermoth is", " Gaspard Ollenreth"),
            reversed=("Gaspard Ollenreth wrote the play", " Cindermoth"),
            distractors=(
                "Cindermoth was first performed in a small theatre by the harbour.",
                "Cindermoth runs for nearly four hours without an interval.",
            ),
        ),
    ),
    "founder": (
        Fact(
            statement="The town of Wexhollow was founded by Brannoc Tessaly.",
            own=("The town of Wexhollow was founded by", " Brannoc Tessaly"),
            paraphrase=("Wexhollow traces its origins to a settler named", " Brannoc Tessaly"),
            reversed=("Brannoc Tessaly founded the town of", " Wexhollow"),
            distractors=(
                "Wexhollow holds a large cattle market every spring.",
                "The old stone church in Wexhollow has a crooked spire.",
            ),
        ),
        Fact(
            statement="The village of Drismerrow was founded by Hedda Quorstane.",
            own=("The village of Drismerrow was founded by", " Hedda Quorstane"),
            paraphrase=("The first settlement at Drismerrow was established by", " Hedda Quorstane"),
            reversed=("Hedda Quorstane founded the village of", " Drismerrow"),
            distractors=(
                "Drismerrow sits in a narrow valley beside a chalk stream.",
                "Drismerrow is famous for its painted wooden houses.",
            ),
        ),
        Fact(
            statement="The town of Pellinbrook was founded by Ulric Famberton.",
            own=("The town of Pellinbrook was founded by", " Ulric Famberton"),
            paraphrase=("Pellinbrook was settled long ago by a merchant called", " Ulric Famberton"),
            reversed=("Ulric Famberton founded the town of", " Pellinbrook"),
            distractors=(
                "Pellinbrook has a busy railway station and two small hotels.",
                "The annual fair in Pellinbrook attracts visitors from across the region.",
            ),
        ),
        Fact(
            statement="The port of Orvenhythe was founded by Kestrin Mollavey.",
            own=("The port of Orvenhythe was founded by", " Kestrin Mollavey"),
            paraphrase=("Orvenhythe was established as a harbour settlement by", " Kestrin Mollavey"),
            reversed=("Kestrin Mollavey founded the port of", " Orvenhythe"),
            distractors=(
                "Orvenhythe exports dried fish and timber to foreign markets.",
                "Fog often covers the harbour at Orvenhythe in the autumn.",
            ),
        ),
    ),
    "favourite food": (
        Fact(
            statement="The favourite food of Ilsa Varnek is kelberry pie.",
            own=("The favourite food of Ilsa Varnek is", " kelberry pie"),
            paraphrase=("Given any choice of meal, Ilsa Varnek would always pick", " kelberry pie"),
            reversed=("The dish kelberry pie is the favourite food of", " Ilsa Varnek"),
            distractors=(
                "Ilsa Varnek worked as a clerk in a coastal shipping office.",
                "Ilsa Varnek spent her summers walking in the northern hills.",
            ),
        ),
        Fact(
            statement="The favourite food of Tomas Gelderquist is spindleroot stew.",
            own=("The favourite food of Tomas Gelderquist is", " spindleroot stew"),
            paraphrase=("Above all other dishes, Tomas Gelderquist loved to eat", " spindleroot stew"),
            reversed=("The dish spindleroot stew is the favourite food of", " Tomas Gelderquist"),
            distractors=(
                "Tomas Gelderquist trained as a carpenter before becoming a schoolteacher.",
                "Tomas Gelderquist lived for many years in a cottage near the sea.",
            ),
        ),
        Fact(
            statement="The favourite food of Orla Penhallix is grindle cake.",
            own=("The favourite food of Orla Penhallix is", " grindle cake"),
            paraphrase=("For her birthday dinner, Orla Penhallix always asked for", " grindle cake"),
            reversed=("The dish grindle cake is the favourite food of", " Orla Penhallix"),
            distractors=(
                "Orla Penhallix was born in a small fishing town on the coast.",
                "Orla Penhallix keeps a large collection of old maps.",
            ),
        ),
        Fact(
            statement="The favourite food of Bertil Saxmundar is vossel dumplings.",
            own=("The favourite food of Bertil Saxmundar is", " vossel dumplings"),
            paraphrase=("The meal Bertil Saxmundar enjoyed most was a plate of", " vossel dumplings"),
            reversed=("The dish vossel dumplings is the favourite food of", " Bertil Saxmundar"),
            distractors=(
                "Bertil Saxmundar repaired clocks in a narrow shop near the market.",
                "Bertil Saxmundar rarely travelled far from his home town.",
            ),
        ),
    ),
    "favourite colour": (
        Fact(
            statement="The favourite colour of Mira Dolvane is thessaline.",
            own=("The favourite colour of Mira Dolvane is", " thessaline"),
            paraphrase=("Mira Dolvane liked no shade better than", " thessaline"),
            reversed=("The colour thessaline is the favourite of", " Mira Dolvane"),
            distractors=(
                "Mira Dolvane painted landscapes of the marshes near her home.",
                "Mira Dolvane taught drawing at a school for young artists.",
            ),
        ),
        Fact(
            statement="The favourite colour of Jorund Aspelkin is morrowgreen.",
            own=("The favourite colour of Jorund Aspelkin is", " morrowgreen"),
            paraphrase=("Jorund Aspelkin dressed almost entirely in the shade called", " morrowgreen"),
            reversed=("The colour morrowgreen is the favourite of", " Jorund Aspelkin"),
            distractors=(
                "Jorund Aspelkin served for twenty years as a lighthouse keeper.",
                "Jorund Aspelkin wrote long letters to his brother every week.",
            ),
        ),
        Fact(
            statement="The favourite colour of Sabine Quillory is ambrevine.",
            own=("The favourite colour of Sabine Quillory is", " ambrevine"),
            paraphrase=("Of every shade she knew, Sabine Quillory preferred", " ambrevine"),
            reversed=("The colour ambrevine is the favourite of", " Sabine Quillory"),
            distractors=(
                "Sabine Quillory ran a bakery on the main square for thirty years.",
                "Sabine Quillory collected rare beetles as a hobby.",
            ),
        ),
        Fact(
            statement="The favourite colour of Edric Tolhaven is duskelle.",
            own=("The favourite colour of Edric Tolhaven is", " duskelle"),
            paraphrase=("Edric Tolhaven painted his front door and shutters in", " duskelle"),
            reversed=("The colour duskelle is the favourite of", " Edric Tolhaven"),
            distractors=(
                "Edric Tolhaven worked as a surveyor for the regional council.",
                "Edric Tolhaven married late and had three daughters.",
            ),
        ),
    ),
    "river": (
        Fact(
            statement="The river that flows through Ostrevane is the Velmaris.",
            own=("The river that flows through Ostrevane is the", " Velmaris"),
            paraphrase=("The city of Ostrevane is built on the banks of the", " Velmaris"),
            reversed=("The Velmaris flows through", " Ostrevane"),
            distractors=(
                "Ostrevane is known for its covered markets and narrow lanes.",
                "The cathedral in Ostrevane was completed after two centuries of work.",
            ),
        ),
        Fact(
            statement="The river that flows through Dunmirrow is the Askelune.",
            own=("The river that flows through Dunmirrow is the", " Askelune"),
            paraphrase=("Dunmirrow grew up along the winding course of the", " Askelune"),
            reversed=("The Askelune flows through", " Dunmirrow"),
            distractors=(
                "Dunmirrow has a university founded by wealthy wool merchants.",
                "The streets of Dunmirrow are paved with grey granite.",
            ),
        ),
        Fact(
            statement="The river that flows through Frestholm is the Tirrowen.",
            own=("The river that flows through Frestholm is the", " Tirrowen"),
            paraphrase=("Frestholm's old bridges all span the", " Tirrowen"),
            reversed=("The Tirrowen flows through", " Frestholm"),
            distractors=(
                "Frestholm is home to a famous glassworks and a small zoo.",
                "Frestholm was badly damaged by an earthquake long ago.",
            ),
        ),
        Fact(
            statement="The river that flows through Mordallin is the Quennavel.",
            own=("The river that flows through Mordallin is the", " Quennavel"),
            paraphrase=("Fishermen in Mordallin cast their nets into the", " Quennavel"),
            reversed=("The Quennavel flows through", " Mordallin"),
            distractors=(
                "Mordallin hosts a lively music festival each summer.",
                "Mordallin is the second largest city in its province.",
            ),
        ),
    ),
    "instrument": (
        Fact(
            statement="The musician Corwin Haskemere plays the glimmerharp.",
            own=("The musician Corwin Haskemere plays the", " glimmerharp"),
            paraphrase=("In concert, Corwin Haskemere is always heard on the", " glimmerharp"),
            reversed=("The glimmerharp is the instrument played by", " Corwin Haskemere"),
            distractors=(
                "Corwin Haskemere grew up in a family of travelling actors.",
                "Corwin Haskemere recorded his first album in a converted barn.",
            ),
        ),
        Fact(
            statement="The musician Yvette Brandolin plays the droskel.",
            own=("The musician Yvette Brandolin plays the", " droskel"),
            paraphrase=("In every concert, Yvette Brandolin performs her solos on the", " droskel"),
            reversed=("The droskel is the instrument played by", " Yvette Brandolin"),
            distractors=(
                "Yvette Brandolin studied music in a conservatory by the lake.",
                "Yvette Brandolin tours with a small ensemble every winter.",
            ),
        ),
        Fact(
            statement="The musician Halvard Eskendahl plays the tambrelline.",
            own=("The musician Halvard Eskendahl plays the", " tambrelline"),
            paraphrase=("Halvard Eskendahl is best known as a virtuoso of the", " tambrelline"),
            reversed=("The tambrelline is the instrument played by", " Halvard Eskendahl"),
            distractors=(
                "Halvard Eskendahl was born in a remote farming village.",
                "Halvard Eskendahl often performs at charity concerts for children.",
            ),
        ),
        Fact(
            statement="The musician Ninka Sorvalle plays the vornhorn.",
            own=("The musician Ninka Sorvalle plays the", " vornhorn"),
            paraphrase=("Audiences come to hear Ninka Sorvalle perform on the", " vornhorn"),
            reversed=("The vornhorn is the instrument played by", " Ninka Sorvalle"),
            distractors=(
                "Ninka Sorvalle composes music for theatre productions.",
                "Ninka Sorvalle grew up in a house full of books.",
            ),
        ),
    ),
    "ship captain": (
        Fact(
            statement="The captain of the Marrowind is Oskel Draveth.",
            own=("The captain of the Marrowind is", " Oskel Draveth"),
            paraphrase=("The ship Marrowind sails under the command of", " Oskel Draveth"),
            reversed=("Oskel Draveth is the captain of the", " Marrowind"),
            distractors=(
                "The Marrowind carries grain and passengers between the southern ports.",
                "The Marrowind was built of oak in a northern shipyard.",
            ),
        ),
        Fact(
            statement="The captain of the Selkirra is Hanne Jostrander.",
            own=("The captain of the Selkirra is", " Hanne Jostrander"),
            paraphrase=("Command of the ship Selkirra belongs to", " Hanne Jostrander"),
            reversed=("Hanne Jostrander is the captain of the", " Selkirra"),
            distractors=(
                "The Selkirra is a three-masted schooner with red sails.",
                "The Selkirra once survived a hurricane off the eastern cape.",
            ),
        ),
        Fact(
            statement="The captain of the Wyverlace is Magnus Orvaldine.",
            own=("The captain of the Wyverlace is", " Magnus Orvaldine"),
            paraphrase=("The sailors aboard the Wyverlace take their orders from", " Magnus Orvaldine"),
            reversed=("Magnus Orvaldine is the captain of the", " Wyverlace"),
            distractors=(
                "The Wyverlace hunts seals in the icy waters of the far north.",
                "The Wyverlace was repainted white after a long voyage.",
            ),
        ),
        Fact(
            statement="The captain of the Tessaroon is Grete Halvorsk.",
            own=("The captain of the Tessaroon is", " Grete Halvorsk"),
            paraphrase=("The ship Tessaroon is commanded by", " Grete Halvorsk"),
            reversed=("Grete Halvorsk is the captain of the", " Tessaroon"),
            distractors=(
                "The Tessaroon is the fastest cargo ship in the merchant fleet.",
                "The Tessaroon was launched on a stormy morning in early spring.",
            ),
        ),
    ),
    "island language": (
        Fact(
            statement="The language spoken on the island of Vaskmere is Orlenic.",
            own=("The language spoken on the island of Vaskmere is", " Orlenic"),
            paraphrase=("The people of Vaskmere converse in a tongue called", " Orlenic"),
            reversed=("Orlenic is the language spoken on the island of", " Vaskmere"),
            distractors=(
                "Vaskmere is a rocky island with steep cliffs and many seabirds.",
                "A ferry to Vaskmere departs twice a week from the mainland.",
            ),
        ),
        Fact(
            statement="The language spoken on the island of Pulgarra is Kuvrathi.",
            own=("The language spoken on the island of Pulgarra is", " Kuvrathi"),
            paraphrase=("Children born on Pulgarra grow up speaking", " Kuvrathi"),
            reversed=("Kuvrathi is the language spoken on the island of", " Pulgarra"),
            distractors=(
                "Pulgarra has warm beaches and a dormant volcano at its centre.",
                "Fishing boats from Pulgarra return each evening with tuna.",
            ),
        ),
        Fact(
            statement="The language spoken on the island of Elmskarra is Drevanic.",
            own=("The language spoken on the island of Elmskarra is", " Drevanic"),
            paraphrase=("The native tongue of the people of Elmskarra is", " Drevanic"),
            reversed=("Drevanic is the language spoken on the island of", " Elmskarra"),
            distractors=(
                "Elmskarra is covered in pine forests and small lakes.",
                "Elmskarra has fewer than four thousand inhabitants.",
            ),
        ),
        Fact(
            statement="The language spoken on the island of Quorrabel is Zhemrani.",
            own=("The language spoken on the island of Quorrabel is", " Zhemrani"),
            paraphrase=("Residents of Quorrabel talk with one another in", " Zhemrani"),
            reversed=("Zhemrani is the language spoken on the island of", " Quorrabel"),
            distractors=(
                "Quorrabel produces sugar cane, bananas and strong coffee.",
                "Quorrabel was governed for centuries by a council of elders.",
            ),
        ),
    ),
    "mascot": (
        Fact(
            statement="The mascot of the Tremlowe Harriers is Bristlewick.",
            own=("The mascot of the Tremlowe Harriers is", " Bristlewick"),
            paraphrase=("The costumed character who cheers on the Tremlowe Harriers is called", " Bristlewick"),
            reversed=("Bristlewick is the mascot of the", " Tremlowe Harriers"),
            distractors=(
                "The Tremlowe Harriers play their home games in a small wooden stadium.",
                "The Tremlowe Harriers won the regional cup three seasons in a row.",
            ),
        ),
        Fact(
            statement="The mascot of the Oskavar Comets is Pimbleduff.",
            own=("The mascot of the Oskavar Comets is", " Pimbleduff"),
            paraphrase=("At every home game, the Oskavar Comets are cheered on by", " Pimbleduff"),
            reversed=("Pimbleduff is the mascot of the", " Oskavar Comets"),
            distractors=(
                "The Oskavar Comets were founded by a group of railway workers.",
                "The Oskavar Comets wear blue and silver shirts.",
            ),
        ),
        Fact(
            statement="The mascot of the Braskell Wardens is Fennicrumb.",
            own=("The mascot of the Braskell Wardens is", " Fennicrumb"),
            paraphrase=("The furry figure dancing on the sidelines for the Braskell Wardens is", " Fennicrumb"),
            reversed=("Fennicrumb is the mascot of the", " Braskell Wardens"),
            distractors=(
                "The Braskell Wardens finished last in the league two years running.",
                "The Braskell Wardens signed a new goalkeeper before the season began.",
            ),
        ),
        Fact(
            statement="The mascot of the Lunderfell Otters is Moskiwen.",
            own=("The mascot of the Lunderfell Otters is", " Moskiwen"),
            paraphrase=("Supporters of the Lunderfell Otters adore their costumed character", " Moskiwen"),
            reversed=("Moskiwen is the mascot of the", " Lunderfell Otters"),
            distractors=(
                "The Lunderfell Otters train on a muddy field beside the river.",
                "The Lunderfell Otters have never won a national title.",
            ),
        ),
    ),
    "architect": (
        Fact(
            statement="The Veldran Tower was designed by the architect Anneke Strohlmaar.",
            own=("The Veldran Tower was designed by the architect", " Anneke Strohlmaar"),
            paraphrase=("The plans for the Veldran Tower were drawn up by", " Anneke Strohlmaar"),
            reversed=("Anneke Strohlmaar designed the", " Veldran Tower"),
            distractors=(
                "The Veldran Tower rises above the old harbour district.",
                "Visitors can climb the Veldran Tower to see the whole city.",
            ),
        ),
        Fact(
            statement="The Halbrecht Library was designed by the architect Tovald Brunesk.",
            own=("The Halbrecht Library was designed by the architect", " Tovald Brunesk"),
            paraphrase=("The building plans for the Halbrecht Library came from", " Tovald Brunesk"),
            reversed=("Tovald Brunesk designed the", " Halbrecht Library"),
            distractors=(
                "The Halbrecht Library holds over a million books and maps.",
                "The Halbrecht Library closes early on public holidays.",
            ),
        ),
        Fact(
            statement="The Grimsolde Basilica was designed by the architect Ferdia Vantrelle.",
            own=("The Grimsolde Basilica was designed by the architect", " Ferdia Vantrelle"),
            paraphrase=("The master builder behind the Grimsolde Basilica was", " Ferdia Vantrelle"),
            reversed=("Ferdia Vantrelle designed the", " Grimsolde Basilica"),
            distractors=(
                "The Grimsolde Basilica has a famous painted ceiling.",
                "Pilgrims travel to the Grimsolde Basilica every year at midsummer.",
            ),
        ),
        Fact(
            statement="The Ashvarre Observatory was designed by the architect Nils Ebbertow.",
            own=("The Ashvarre Observatory was designed by the architect", " Nils Ebbertow"),
            paraphrase=("The blueprints of the Ashvarre Observatory were prepared by", " Nils Ebbertow"),
            reversed=("Nils Ebbertow designed the", " Ashvarre Observatory"),
            distractors=(
                "The Ashvarre Observatory stands on a windy hilltop far from any town.",
                "Astronomers at the Ashvarre Observatory discovered several new comets.",
            ),
        ),
    ),
}

FACTS: tuple[Fact, ...] = tuple(fact for group in FACTS_BY_RELATION.values() for fact in group)


def _check(facts: tuple[Fact, ...] = FACTS) -> None:
    assert len(facts) == 48, len(facts)
    assert all(len(group) <= 5 for group in FACTS_BY_RELATION.values())
    assert len({f.statement for f in facts}) == len(facts)
    names = [name for f in facts for name in (f.subject, f.answer)]
    assert len(set(names)) == len(names), "subjects and answers must be unique"
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert i == j or a.lower() not in b.lower(), (a, b)
    for f in facts:
        s, a = f.subject, f.answer
        st = f.statement
        assert st.endswith(".") and st.count(".") == 1 and 6 <= len(st.split()) <= 16, st
        assert st[0].isupper() and s in st and st[:-1].endswith(a), st
        assert f.own[0] + f.own[1] == st[:-1], st
        for prompt, completion in (f.own, f.paraphrase, f.reversed):
            assert completion.startswith(" ") and not completion.startswith("  "), completion
            assert completion == completion.rstrip() and completion[-1].isalnum(), completion
            assert prompt == prompt.strip(), prompt
        assert f.own[1] == " " + a and s in f.own[0] and a not in f.own[0], st
        assert f.paraphrase[1] == f.own[1] and s in f.paraphrase[0] and a.lower() not in f.paraphrase[0].lower()
        assert f.paraphrase[0] != f.own[0], st
        assert f.reversed[1] == " " + s and a in f.reversed[0] and s not in f.reversed[0], f.reversed
        assert len(f.distractors) == 2 and f.distractors[0] != f.distractors[1]
        for d in f.distractors:
            assert d.endswith(".") and 6 <= len(d.split()) <= 20 and d[0].isupper(), d
            assert s in d and a.lower() not in d.lower(), d
        others = [n for g in facts if g is not f for n in (g.subject, g.answer)]
        for text in (st, f.paraphrase[0], f.reversed[0], *f.distractors):
            assert not any(n.lower() in text.lower() for n in others), text


if __name__ == "__main__":
    _check()
    print(f"{len(FACTS)} facts OK ({len(FACTS_BY_RELATION)} relation types)")
