"""Haystack text and word lists for the synthetic long-context tasks, all original to apb.

Two haystacks:
- `NOISE_SENTENCES`: a handful of plain sentences repeated without end (the "noise" haystack that RULER and
  InfiniteBench both use for retrieval tasks).
- `essay_text()`: ~42 KB of essays about invented crafts and places, generated deterministically from a small
  grammar (topics x paragraph moves x fillers) written for apb, so we can ship it and rebuild it offline. It
  stands in for the essay corpus RULER downloads; like RULER, callers cycle it when they need more text.

Word lists: `KEY_ADJECTIVES` x `KEY_NOUNS` make needle keys ("amber-lantern"); `COMMON_WORDS` feeds the
common-words task and is filtered so that no word is a substring of another (a prediction that names one word
can never match another by accident).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# ---------------------------------------------------------------------------------------------------------
# Essay grammar. Each topic fills the same slots; each paragraph kind is a list of "moves": one sentence, or a
# tuple of sentences that only make sense together (a claim and its follow-up).

_TOPICS: tuple[dict[str, str], ...] = (
    dict(
        place="Veloran", members="salt-glass makers", member="salt-glass maker", craft="salt-glass making",
        product="salt-glass", item="a shallow green bowl", material="kelp ash and pale harbor sand",
        season="the last weeks of autumn", tool="a long pipe of blackened iron", founder="Ilse Marrow",
        deed="found a lump of green glass in the ashes of a beach fire", far="the river cities of the south",
        skill="judging the heat of a furnace by the color of its flame",
        sight="rows of cooling bowls on nearly every window ledge",
        customer="ship captains who wanted lamps that would not crack in the cold",
        rival="the large foundries of Dunmere", hazard="the great storm of the ninth winter",
        modern="electric furnaces", lesson="a material is only as good as the patience of the person shaping it",
    ),
    dict(
        place="Orsk Bay", members="tide librarians", member="tide librarian", craft="tide librarianship",
        product="the floating libraries", item="a hand-copied tide almanac",
        material="oiled canvas, cedar boards and sealing wax", season="the calm weeks of early summer",
        tool="a brass hook for lifting wet crates", founder="Tobiah Venn",
        deed="loaded his books onto a fishing boat to save them from a flood", far="the inland monasteries",
        skill="knowing which shelves will stay dry when the boat leans",
        sight="a line of boats stacked high with wooden crates at the end of every pier",
        customer="fishing families who borrowed charts and stories in equal measure",
        rival="the new public library on the hill", hazard="the fire of the long drought",
        modern="waterproof plastics", lesson="knowledge survives best when it is carried to the people who need it",
    ),
    dict(
        place="the Kettle Hills", members="moth keepers", member="moth keeper", craft="lantern-moth keeping",
        product="the lantern moths", item="a woven cage holding a dozen glowing moths",
        material="elderflower nectar and damp moss", season="early spring", tool="a fine brush of badger hair",
        founder="Old Corwen Dale", deed="noticed the moths gathering around a broken honey jar and followed them home",
        far="the coastal towns", skill="keeping the moths calm enough to glow steadily",
        sight="faint green lights drifting along the hedges after dark",
        customer="shepherds who needed a light that would not startle their flocks",
        rival="cheap oil lamps from the lowlands", hazard="the cold summer", modern="battery lamps",
        lesson="the gentlest methods are often the most durable",
    ),
    dict(
        place="Amarant Gorge", members="bridge weavers", member="bridge weaver", craft="rope-bridge weaving",
        product="the rope bridges", item="a footbridge of twisted grass cable",
        material="mountain grass twisted into cords as thick as a wrist", season="the dry season",
        tool="a wooden fid polished by years of use", founder="Sera Quillon",
        deed="stretched a single cord across the river so her village could trade with the far bank",
        far="the valleys beyond the pass", skill="feeling how much strain a cord can take before it snaps",
        sight="thin bridges swaying high above the water", customer="traders, pilgrims and herders",
        rival="the steel bridge built by the provincial government", hazard="the earthquake",
        modern="steel anchors", lesson="what is renewed every year can last forever",
    ),
    dict(
        place="Tessaly Street", members="weather-clock makers", member="weather-clock maker",
        craft="weather-clock making", product="the weather clocks",
        item="a brass clock whose second hand trembles before rain",
        material="brass, gut string and strips of seasoned ash", season="the damp months",
        tool="a jeweler's loupe", founder="Amos Brennick",
        deed="noticed that an old clock ran slow whenever a storm was coming",
        far="the harbor offices of three countries",
        skill="tuning a string so that it answers to damp air and nothing else",
        sight="hundreds of clocks ticking in a single narrow window", customer="farmers and harbor masters",
        rival="the national weather service", hazard="the long depression", modern="digital sensors",
        lesson="an instrument is only useful if people trust it",
    ),
    dict(
        place="the Drowned Coast", members="sandbank cartographers", member="sandbank cartographer",
        craft="sandbank mapping", product="the sandbank charts", item="a chart drawn in three colors of ink",
        material="long linen sheets, lead weights and knotted sounding lines", season="the low tides of late summer",
        tool="a sounding line knotted every half fathom", founder="Pell Hardacre",
        deed="ran aground twice in one week and decided to draw a better map", far="the naval schools of the capital",
        skill="reading the color of the water over hidden sand",
        sight="small boats drifting at dawn while someone calls out numbers",
        customer="fishing fleets and cargo pilots",
        rival="the official admiralty charts", hazard="the winter of the great flood", modern="satellite images",
        lesson="a map is a promise that has to be renewed",
    ),
    dict(
        place="Bellwether", members="orchard teachers", member="orchard teacher", craft="orchard teaching",
        product="the orchard schools", item="a notebook of pressed leaves and careful drawings",
        material="grafting wax, twine and young apple stock", season="the weeks before the harvest",
        tool="a folding pruning knife", founder="Hester Lune",
        deed="held her lessons outdoors when the schoolhouse roof collapsed", far="the universities of the north",
        skill="turning whatever the trees are doing that day into a lesson",
        sight="children sitting on wooden crates between long rows of trees",
        customer="families who could not afford the city schools",
        rival="the modern schools built after the railway arrived", hazard="the blight", modern="tablet computers",
        lesson="children learn fastest when the lesson is something they can touch",
    ),
    dict(
        place="Castor Vale", members="bell founders", member="bell founder", craft="bell founding",
        product="the bells of the valley", item="a small bell with a surprisingly deep voice",
        material="copper, tin and clay mixed with horse hair", season="the dry weeks of midsummer",
        tool="a wooden template that shapes the mold", founder="Brother Aldous",
        deed="melted down a broken cooking pot to cast a bell for his chapel", far="cathedrals across the continent",
        skill="predicting the note of a bell before it is cast",
        sight="bells of every size hanging from the beams of an open barn", customer="churches, schools and ships",
        rival="cheap factory bells", hazard="the war", modern="computer models of sound",
        lesson="some things can only be tested by making them",
    ),
    dict(
        place="the Ambling Delta", members="river pilots", member="river pilot", craft="river piloting",
        product="safe passage through the channels", item="a logbook covered in tiny sketches of the riverbank",
        material="long poles of seasoned willow, rope and tar", season="the flood months",
        tool="a long pole marked with notches", founder="Mattis Orrow",
        deed="guided a lost grain barge through the channels in a thick fog", far="the sea ports of the west",
        skill="feeling the current through the soles of the feet",
        sight="flat boats waiting at the river mouth for a pilot to climb aboard",
        customer="grain merchants and ferry owners", rival="the dredged canals",
        hazard="the year the river changed its course", modern="depth sounders",
        lesson="the most valuable knowledge is often local and hard to move",
    ),
    dict(
        place="Pellam", members="night gardeners", member="night gardener", craft="night gardening",
        product="the moon gardens", item="a bed of white flowers that open only after sunset",
        material="river silt, crushed shells and rainwater", season="the first warm nights",
        tool="a shaded lantern", founder="Ada Fennimore",
        deed="worked in the fields by day and could only tend her flowers at night",
        far="the palace gardens of the capital", skill="knowing which flowers will open under a cloudy sky",
        sight="people walking slowly through dark gardens with shaded lanterns",
        customer="perfume makers and people who could not sleep", rival="the greenhouses of the lowlands",
        hazard="the drought", modern="solar lights",
        lesson="beauty that needs the right conditions is worth waiting for",
    ),
    dict(
        place="the Northern Reach", members="ice-road couriers", member="ice-road courier",
        craft="ice-road courier work", product="the ice roads", item="a sealed leather mail pouch",
        material="sled runners of bent birch, canvas and tallow", season="the coldest weeks of the year",
        tool="an ice chisel with a long ash handle", founder="Kasimir Voll",
        deed="crossed the frozen lake with medicine for a sick child", far="the southern capitals",
        skill="judging the thickness of ice by the sound it makes",
        sight="lines of lanterns crossing the frozen lake before dawn", customer="remote villages and fur traders",
        rival="the airplane mail service", hazard="the warm winter", modern="satellite receivers",
        lesson="reliability is a kind of courage",
    ),
    dict(
        place="Mirrow Island", members="kite signalers", member="kite signaler", craft="kite signaling",
        product="the signal kites", item="a red and white kite that can be read from five miles away",
        material="bamboo, silk and fish glue", season="the windy weeks of spring", tool="a reel of waxed line",
        founder="Lio Tamsin", deed="flew a kite to warn the fishing boats of an approaching storm",
        far="the mainland harbors", skill="reading the wind high above the ground",
        sight="dozens of colored kites hanging almost still over the cliffs",
        customer="fishing crews and lighthouse keepers", rival="the telegraph", hazard="the typhoon",
        modern="radio", lesson="a simple signal that everyone understands beats a clever one that nobody does",
    ),
    dict(
        place="Oldmoor", members="cave wardens", member="cave warden", craft="cave ripening",
        product="the cave cheeses", item="a wheel of cheese with a gray, wrinkled rind",
        material="sheep's milk, salt and the cold air of the caves", season="late spring",
        tool="a thin steel probe", founder="Maud Ellery",
        deed="hid her winter stores in a cave and found them improved in the spring",
        far="markets on the far side of the sea", skill="deciding when a cheese is ready by tapping its rind",
        sight="wooden shelves disappearing into the dark", customer="innkeepers and sailors",
        rival="the dairy factories of the plains", hazard="the cave collapse", modern="humidity meters",
        lesson="time is an ingredient like any other",
    ),
    dict(
        place="the Harrow Downs", members="whistle carvers", member="whistle carver", craft="whistle carving",
        product="the stone whistles", item="a whistle no longer than a thumb", material="soft chalk stone and beeswax",
        season="the wet months of winter", tool="a set of tiny bone drills", founder="Wendel Ashcombe",
        deed="carved a whistle to call his dog across the hills", far="music halls in distant cities",
        skill="hearing the pitch of a whistle before it is finished",
        sight="shepherds calling to one another across the valleys", customer="shepherds, hunters and children",
        rival="cheap tin whistles", hazard="the sickness of the flocks", modern="power drills",
        lesson="a tool shaped by its owner's hands is never quite replaceable",
    ),
)

_MOVES: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "intro": (
        "Few visitors to {place} leave without hearing about the {members}.",
        "If you ask anyone in {place} what makes it different, the answer usually involves {craft}.",
        ("For most of its history, {place} was known above all for {product}.",
         "That is still true, although fewer people now know why."),
        "The first thing a newcomer notices is {sight}.",
        "It is tempting to treat {craft} as a quaint leftover from another age, but the people who practice it would "
        "disagree.",
        "I spent {duration} among the {members}, and I came away with more questions than answers.",
        "Their work is easy to describe and very hard to do well.",
        "What follows is an attempt to explain how the {members} work, why they have lasted so long, and what the "
        "rest of us might learn from them.",
    ),
    "origins": (
        "Nobody agrees on exactly when {craft} began, but the oldest records in {place} mention it in {century}.",
        ("According to a story still told in {place}, the tradition started with {founder}, who {deed}.",
         "Whether or not the story is true, it says something about how {place} sees itself."),
        "For generations the knowledge passed from parent to child, and outsiders were rarely allowed to watch.",
        "By {century}, the reputation of {product} had spread as far as {far}.",
        "The early {members} worked without written instructions; everything was memorized and repeated until it "
        "became habit.",
        ("Several old account books survive from that period.",
         "They show that {craft} was never a rich trade, only a steady one."),
        "Historians have argued for decades about whether {founder} existed at all.",
        "The first written description of the work was made by a traveler who misunderstood almost all of it.",
    ),
    "method": (
        "The work begins with {material}, which has to be gathered in {season}.",
        "Everything depends on {skill}.",
        "A single piece, such as {item}, can take {short} to finish.",
        "The most important tool is {tool}, and most {members} refuse to lend theirs to anyone.",
        ("Beginners are usually surprised by how much of the job is waiting.",
         "The hands are busy for an hour, and then nothing happens for a day."),
        "There are no shortcuts; a mistake made early in the process shows up at the very end, when it is too late "
        "to fix.",
        "Experienced {members} say they can tell a good batch by its smell alone, which sounds like an exaggeration "
        "until you watch them do it.",
        "Measurements are taken by hand and by eye, and the numbers are rarely written down.",
        "The rhythm of the work follows the seasons more than the clock.",
    ),
    "people": (
        "{elder}, who has practiced {craft} for {years}, still starts every morning in exactly the same way.",
        "When I asked {elder} what separates a good {member} from an ordinary one, {pron} thought for a long time "
        "and then said: \"{quote}\"",
        "Apprentices spend their first {small} years doing nothing but the simplest tasks.",
        "{apprentice}, one of the youngest apprentices, told me that the hardest lesson was learning to slow down.",
        "There is a quiet competition between the families, but it rarely turns unfriendly.",
        "Most {members} are not famous, even in {place}, and they seem to prefer it that way.",
        "{apprentice} keeps a notebook of every mistake made in the workshop, including the ones made by the "
        "masters.",
    ),
    "trade": (
        "For a long time the people who depended on it most were {customer}.",
        "Prices have never been high, and few families have grown rich from {craft}.",
        "The trade survived because it was useful, not because it was admired.",
        "Competition from {rival} nearly ruined the business more than once.",
        "A good year meant enough money to repair the workshops and feed the apprentices; a bad year meant neither.",
        "Some patrons come back every {season_word} for decades, and they are treated almost as members of the "
        "family.",
    ),
    "hardship": (
        "{hazard} nearly ended the tradition; of the {num} families who practiced it before, only {small} kept "
        "going.",
        "In the years that followed, many young people left {place} for work in the cities.",
        "The survivors rebuilt slowly, often with borrowed tools and borrowed money.",
        "It is striking how rarely anyone in {place} talks about that period.",
        "Some of the old methods were lost for good, and nobody alive remembers them now.",
    ),
    "modern": (
        "Today {modern} have changed some parts of the work, though not the parts that matter most.",
        "A small museum in {place} now displays {item} said to be more than {big} years old.",
        "Younger {members} post pictures of their work online, which has brought a new kind of visitor.",
        "Some of the older {members} worry that speed is replacing care.",
        "There are now more people learning the craft than at any time in the last century.",
        "Whether {craft} will survive another hundred years is an open question, and the {members} argue about it "
        "constantly.",
    ),
    "reflection": (
        "Perhaps that is the real lesson of the {members}: {lesson}.",
        "It would be easy to dismiss {craft} as a curiosity.",
        "Watching the {members} at work, I kept thinking about how much of any skill never appears in a manual.",
        "The longer I stayed in {place}, the less strange {craft} seemed.",
        "If there is a single thing to take away, it is that {lesson}.",
    ),
}

# Sentences that fit any topic; sprinkled between moves so the essays do not all read alike.
_ASIDES: tuple[str, ...] = (
    "Most skills look simple from the outside because the difficult part happens in the head.",
    "A tradition survives not because people remember it, but because they keep finding it useful.",
    "It is easy to mistake slowness for inefficiency.",
    "The best way to understand a craft is to try it badly for a while.",
    "What looks like stubbornness is often a long memory of what went wrong before.",
    "Small communities are often better at keeping knowledge than large institutions.",
    "Good work tends to be invisible; people only notice the work that fails.",
    "There is a kind of knowledge that cannot be written down, only shown.",
    "Every trade has its own vocabulary, and learning the words is half of learning the work.",
    "People who make things with their hands tend to distrust anyone who talks too quickly.",
    "The hardest part of teaching is deciding what not to explain.",
    "Ambition looks different in a place where nobody expects to become famous.",
    "A good apprentice asks fewer questions than a bad one, but better ones.",
    "Nothing ages faster than a clever shortcut.",
    "It is worth asking why some crafts vanish while others, just as old, carry on.",
    "Much of what we call talent is attention that has been paid for a very long time.",
    "Outsiders usually admire the finished object; insiders admire the decisions behind it.",
    "Patience is not the same as waiting; it is waiting while paying attention.",
    "The people who last in a demanding trade are rarely the most gifted ones at the start.",
    "A town can be proud of something without understanding it.",
    "There is always a gap between how a thing is described and how it is actually done.",
    "Most of the important inventions in any craft were made by people whose names nobody recorded.",
    "Habits that look arbitrary usually turn out to have a reason, even if it has been forgotten.",
    "Work that is done the same way for centuries is never quite the same work.",
    "The most useful advice is often the most boring to hear.",
    "Anyone can follow instructions; the craft begins where the instructions stop.",
    "A community that teaches its children a difficult skill is making a bet about the future.",
    "It is hard to value something properly until you have watched someone spend a year on it.",
)

_QUOTES: tuple[str, ...] = (
    "Patience, and a willingness to throw away your own work.",
    "You have to care about the parts nobody will ever see.",
    "Listening. Most people only pretend to listen.",
    "A good one knows when to stop.",
    "Nothing. Some people simply keep going after everyone else has gone home.",
    "The ordinary ones are in a hurry.",
    "You learn the work from your failures, and you learn the trade from your customers.",
    "Respect for the material. It was here before us and it will be here after.",
)

_ELDERS: tuple[tuple[str, str], ...] = (
    ("Maren Solvik", "she"), ("Edric Pell", "he"), ("Ottilie Brand", "she"), ("Joss Kerrigan", "he"),
    ("Nadia Orlen", "she"), ("Barnaby Stroud", "he"), ("Agnes Whitlow", "she"), ("Tomas Reyle", "he"),
    ("Ingrid Halloway", "she"), ("Fennick Marsh", "he"),
)
_APPRENTICES: tuple[str, ...] = (
    "Rosa", "Teodor", "Lina", "Pim", "Sanne", "Caius", "Milo", "Yara", "Nell", "Aurel", "Greta", "Idris",
)
_CENTURIES = ("the ninth century", "the tenth century", "the eleventh century", "the twelfth century",
              "the thirteenth century", "the fourteenth century")
_SMALL = ("two", "three", "four")
_NUMS = ("seven", "nine", "eleven", "twelve", "fifteen", "twenty")
_YEARS = ("forty years", "more than thirty years", "over half a century", "twenty-six years", "most of a lifetime")
_DURATIONS = ("a whole winter", "three months", "most of a year", "two long summers", "several weeks")
_SHORT = ("three weeks", "a whole month", "nine days", "most of a season", "several days")
_BIG = ("three hundred", "five hundred", "eight hundred", "a thousand")
_SEASON_WORDS = ("spring", "summer", "autumn", "winter", "year")

_PLAN = (("intro", 3, 4), ("origins", 3, 5), ("method", 4, 6), ("people", 3, 5), ("trade|hardship", 3, 4),
         ("modern", 3, 4), ("reflection", 2, 3))


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _essay(topic: dict[str, str], rng: random.Random) -> list[str]:
    """One essay as a list of paragraphs; the moves of each paragraph keep their written order."""
    elder, pron = rng.choice(_ELDERS)
    slots = dict(topic, elder=elder, pron=pron, apprentice=rng.choice(_APPRENTICES), quote=rng.choice(_QUOTES),
                 century=rng.choice(_CENTURIES), small=rng.choice(_SMALL), num=rng.choice(_NUMS),
                 years=rng.choice(_YEARS), duration=rng.choice(_DURATIONS), short=rng.choice(_SHORT),
                 big=rng.choice(_BIG), season_word=rng.choice(_SEASON_WORDS))
    paragraphs = []
    for kinds, lo, hi in _PLAN:
        kind = rng.choice(kinds.split("|"))
        moves = _MOVES[kind]
        chosen = sorted(rng.sample(range(len(moves)), rng.randint(lo, min(hi, len(moves)))))
        sentences: list[str] = []
        for i in chosen:
            move = moves[i]
            sentences.extend([move] if isinstance(move, str) else move)
        if kind not in ("intro", "reflection") and rng.random() < 0.6:
            sentences.insert(rng.randint(1, len(sentences)), rng.choice(_ASIDES))
        paragraphs.append(" ".join(_capitalize(s.format(**slots)) for s in sentences))
    return paragraphs


@lru_cache(maxsize=1)
def essay_text() -> str:
    """The essay haystack: every topic's essay, paragraphs separated by blank lines (deterministic, ~42 KB)."""
    paragraphs = []
    for i, topic in enumerate(_TOPICS):
        paragraphs.extend(_essay(topic, random.Random(1000 + i)))
    return "\n\n".join(paragraphs)


@lru_cache(maxsize=1)
def essay_units() -> tuple[tuple[str, ...], tuple[bool, ...], tuple[bool, ...]]:
    """The essay split into words with their trailing whitespace, so that "".join(words) is the essay.

    Returns (words, sentence_start, paragraph_start): a needle may be inserted before word i when
    sentence_start[i]; paragraph_start[i] marks where a cycled haystack may begin. The last word carries a
    paragraph break so that the essay can be repeated end to end.
    """
    words = re.findall(r"\S+\s*", essay_text())
    words[-1] = words[-1].rstrip() + "\n\n"
    sentence_start = [True] + [re.search(r"[.!?]\"?\s+$", w) is not None for w in words[:-1]]
    paragraph_start = [True] + [w.endswith("\n\n") for w in words[:-1]]
    return tuple(words), tuple(sentence_start), tuple(paragraph_start)


# ---------------------------------------------------------------------------------------------------------
# Word lists (written for apb).

KEY_ADJECTIVES: tuple[str, ...] = tuple("""
amber ancient arctic autumn bitter blazing bold brave breezy bright brisk broken bronze calm careful cheerful
clever cloudy copper cosmic crimson crisp curious daring dusty eager early electric elegant emerald empty
faded fancy fearless fierce flying foggy fragile frozen gentle giant gilded glassy golden graceful grand
hidden hollow humble icy idle indigo iron ivory jolly keen lively lonely lucky lunar marble mellow merry
misty modest molten narrow noble nimble olive orange patient pearly plain polished proud purple quick quiet
rapid restless rosy royal rustic sandy scarlet secret serene shady sharp shiny silent silver simple sleepy
slender smoky solar solemn sparkling spicy steady stormy sturdy sunny swift tender thirsty tidy tiny tranquil
velvet violet vivid wandering warm wild windy wise wooden young zealous
""".split())

KEY_NOUNS: tuple[str, ...] = tuple("""
acorn anchor antler apple arrow attic badger balloon banjo barrel basket beacon beetle blanket blossom bonnet
bottle bracelet breeze brook bucket buffalo butterfly cabin cactus camel candle canoe canyon caravan carpet
castle cellar chariot cherry chimney cinnamon clover cobweb comet compass cottage coyote crayon cricket crown
crystal cushion cypress dolphin dragon drum eagle easel ember falcon feather fern fiddle flute forest fountain
fox garden garnet geyser glacier goblet gondola grove guitar hammock harbor harp hazel hedgehog heron hill
honey horizon island jackal jasmine jewel kettle kite ladder lagoon lantern lemon lighthouse lily lobster
locket magnet mango maple meadow meteor mirror mitten monsoon moss mountain mushroom needle nest oasis ocean
orchard otter owl paddle palace panda parrot pebble pepper piano pillow pine planet pocket pony puddle pumpkin
quarry quill rabbit raven reef ribbon river robin rocket saddle sail salmon satchel scarf shell shovel sparrow
spoon squirrel stable statue storm sundial swan teapot thistle thunder tiger timber torch tower trumpet tulip
tunnel turtle umbrella valley vase violin volcano wagon walnut waterfall whistle willow window wizard zebra
""".split())

_COMMON_WORDS_RAW = """
abbey absence account actor address advice afternoon agency airport album alley almond altar amount angle
ankle answer apron arcade arena argument armchair army artist aspect atlas audience author avenue bakery
balcony ballet bamboo bandage banker banner bargain baron basin battery bazaar beach beard bedroom beggar
belief bench berry bicycle biscuit bishop blade blender bloom blouse board bonus border bottom boulder
bouquet boxer brain branch brass bread brick bride bridge brush bubble budget buffet builder bulletin bundle
burden butcher button cabbage cable cafe calendar camera campus canal cannon captain carbon cargo carriage
carrot cartoon cashier casino cathedral cattle cavern ceiling cement census cereal chair chalk champion
channel chapel chapter charity charter cheek chef chemist chess chicken chorus cider cigar circus citizen
clamp clerk cliff climate clinic clock closet cloth coach coast cobbler cocoa coffee coin collar colony
column comedy concert condor cook coral corner corridor costume cotton council county courage cousin cradle
crane crater credit crew crocodile crowd cruise cupboard curtain customer dairy dancer danger daughter dealer
debate decade deck degree delta dentist depot desert desk detail diamond diary dinner director disk ditch
doctor donkey doorway dough dozen drawer dream dress driver drought duck dune dust duty dwarf echo editor
elbow elephant elevator emblem empire engine envelope episode error essay estate evening exhibit fabric
factory fairy family farmer fashion faucet fence ferry festival fever field figure film finger fireplace
fisher flag flame flannel fleet flour flower folder folk forge fortune fossil frame freight fridge friend
frog frontier fruit funnel furnace gadget galaxy gallery garage garlic gate gazette gear gender ginger giraffe
glove glue goat gold gorilla gossip governor gown grain grammar granite grape grass gravel gravy grocer guard
guest guide gutter habit hall hamlet handle harvest hatch hawk headline health hearth heaven helmet herb
hermit highway hinge history hobby holiday hook horse hospital hostel hotel hunter hurricane husband igloo
image income infant inkwell insect inspector iris ivory jacket jail jazz jeep jelly jersey jockey journal
journey judge juice jungle jury kayak kernel keyboard kidney kingdom kitchen kitten knight knob label
laboratory lace lake lamb lamp landlord laptop lawyer layer leader leaf league lecture ledge legend lens
letter lever library license lizard llama loaf lobby lodge logic lounge luggage lumber lunch machine magazine
maid mailbox mammal manager mansion manual marathon market marsh mask mast mayor meal medal melody melon
member memory menu merchant message metal method midnight mineral minister minute mission model monastery
monkey monster month monument moose morning mosquito motor mouse movie muffin mule museum music mustard
myth napkin nation navy necklace neighbor nephew nerve network niece noodle notebook novel nurse nutmeg oath
object office olive omelet onion opera orbit orchestra organ outfit oven owner oyster package pagoda painter
pajamas palm pamphlet pancake panel panther parade parcel parish parking partner passenger pasta pastry
pasture patrol pattern pavement peanut pear peasant pedal pelican pencil penguin pension pepperoni perfume
person pharmacy phone photo physics pickle picnic pier pigeon pilgrim pilot pirate pistol pitcher pizza
plank plaster plate platform player plaza plum plumber poem poet polka pond porch portrait potato pottery
powder prairie prayer prince printer prison problem producer professor profit program project promise
prophet proverb province pudding pulley puppet purse puzzle pyramid quarter queen question quilt rabbi
racket radar radio raft railway rainbow raisin ranch razor reader recipe record refuge region reindeer
report reptile rescue resort result rhythm rifle ritual road robot rodent roof rooster rope rose rubber
ruby rumor sailor salad saloon sandal sardine satellite sauce sausage scandal scholar school science scissors
scooter scout screen script sculptor season seed senator sermon servant shadow shampoo shark sheep shelf
shepherd sheriff shirt shoe shop shoulder shower shrimp shrine siren sister skate sketch skill skirt skull
slipper slope smile snail snake soap soccer society sock sofa soldier sonnet soup spider spinach sponge
squad stadium staff stage staircase stamp station steak steam stew stomach stool story stove stranger
straw stream street student studio subway sugar suitcase summit supper surgeon survey sweater symbol syrup
tablet tailor talent tavern taxi teacher temple tenant tennis tent terrace textbook theater theory thread
throne ticket timer tobacco toddler tomato tongue tractor trader traffic tragedy trail trainer tram treasure
treaty tribe trolley trophy truck trunk tuba turkey tutor twig uncle uniform universe vacuum vanilla vault
vendor verdict verse vessel veteran village vinegar visitor vitamin voice volume vulture waiter walrus
wardrobe warrior weasel weather wedding whale wheat wheel widow winner winter wolf worker workshop wreath
wrist yacht yard yogurt zipper
"""


def _no_substrings(words: list[str]) -> tuple[str, ...]:
    """Drop every word that occurs inside another word of the list (keeps the longer one), and duplicates."""
    unique = sorted(set(words))
    return tuple(w for w in unique if not any(w != other and w in other for other in unique))


COMMON_WORDS: tuple[str, ...] = _no_substrings(
    [w for w in _COMMON_WORDS_RAW.split() if len(w) >= 4]
    + [w for w in KEY_NOUNS if len(w) >= 4]
)
